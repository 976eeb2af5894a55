// The form: the request it makes, what it refuses before sending (API.md's limits), and the server's
// refusals put in words.

import { HttpError } from "./sse.js";

const LIMITS = { side: 1024, steps: 200, tokens: 4096, rounds: 8 }; // API.md's limits for BAGEL
const LABELS = {
  prompt: "Prompt", mode: "Mode", rounds: "Image rounds", width: "Width", height: "Height", steps: "Denoising steps",
  seed: "Seed", max_tokens: "Thinking tokens", temperature: "Temperature", api_key: "API key",
  input_image: "Image", images: "Image", task: "Task",
};

/** The request body in `form`, and the problems that keep it from being sent (none unless `validate`). */
export function readForm(form, validate = true) {
  const problems = [];
  const raw = (name) => form.elements[name].value.trim();
  const number = (name, lo, hi, { integer = true, multiple = 1, optional = false } = {}) => {
    const text = raw(name);
    if (optional && text === "") return undefined;
    const value = Number(text);
    const ok = text !== "" && Number.isFinite(value) && (!integer || Number.isInteger(value));
    if (validate && !(ok && value >= lo && value <= hi && (multiple === 1 || value % multiple === 0))) {
      const kind = multiple > 1 ? `a multiple of ${multiple}` : integer ? "a whole number" : "a number";
      problems.push([name, `${LABELS[name]} must be ${kind} from ${lo} to ${hi}.`]);
    }
    return value;
  };
  const prompt = form.elements.prompt.value;
  const task = raw("task") || "generate";
  const what = { generate: "a prompt", edit: "an instruction", understand: "a question" }[task];
  if (validate && !prompt.trim()) problems.push(["prompt", `Type ${what} first.`]);
  if (validate && task !== "generate" && !form.elements.input_image.files?.length) {
    problems.push(["input_image", "Pick an image first (PNG, JPEG or WebP)."]);
  }
  const mode = raw("mode");
  const body = {
    prompt,
    mode,
    thinking: {
      max_tokens: number("max_tokens", 1, LIMITS.tokens),
      temperature: number("temperature", 0, 10, { integer: false }),
    },
    stream: true,
  };
  if (task === "generate") {
    body.width = number("width", 16, LIMITS.side, { multiple: 16 });
    body.height = number("height", 16, LIMITS.side, { multiple: 16 });
  }
  if (task === "understand") {
    body.task = "understand";
    if (mode === "irg") body.mode = "direct";
  } else {
    body.steps = number("steps", 2, LIMITS.steps);
  }
  if (body.mode === "irg") body.rounds = number("rounds", 2, LIMITS.rounds);
  const seed = number("seed", 0, Number.MAX_SAFE_INTEGER, { optional: true });
  if (seed !== undefined) body.seed = seed;
  return { body, problems };
}

/** Mark the fields of `problems` ([name, message] pairs) and say what is wrong in `box`. */
export function showProblems(form, box, problems, summary) {
  for (const [name] of problems) {
    form.elements[name]?.setAttribute("aria-invalid", "true");
    form.elements[name]?.setAttribute("aria-errormessage", "form-error");
  }
  box.textContent = summary ?? problems.map(([, message]) => message).join(" ");
  box.hidden = false;
  form.elements[problems[0]?.[0]]?.focus();
}

export function clearProblems(form, box) {
  form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
  box.hidden = true;
}

/** An error in words, and the form field it is about; `keySent`: the request carried an API key. */
export function describe(err, keySent = false) {
  if (!(err instanceof HttpError)) {
    const offline = err instanceof TypeError;
    return { message: offline ? `Could not reach the server (${err.message}).` : err.message };
  }
  const info = err.body?.error ?? {};
  const detail = info.message ?? (typeof err.body?.detail === "string" ? err.body.detail : null);
  let field = info.field ? info.field.split(".").pop().replace(/\[\d+\]$/, "") : null;
  if (field === "images") field = "input_image";
  switch (err.status) {
    case 401:
    case 403: {
      const refused = `The server refused the API key (${detail ?? `HTTP ${err.status}`}).`;
      const why = keySent ? refused : "This server needs an API key.";
      return { message: `${why} Enter your key and press Generate again.`, field: "api_key" };
    }
    case 404:
      return { message: "The server does not know this job (it may have expired)." };
    case 413:
      return { message: `The server refused the request: ${detail ?? "it is too large"}.`,
               field: field ?? "input_image" };
    case 422: {
      // The server's message starts with the field's path ("width: must be ..."): name it as the form does.
      let what = detail ?? `${info.field ?? "the request"} is not valid`;
      if (info.field && what.startsWith(`${info.field}:`)) {
        what = `${LABELS[field] ?? info.field}${what.slice(info.field.length)}`;
      }
      return { message: `The server refused the request. ${what}.`, field };
    }
    case 429:
      return { message: "The queue is full.", retryAfter: Number.parseInt(err.retryAfter ?? "5", 10) || 5 };
    default:
      return { message: `The server answered HTTP ${err.status}${detail ? `: ${detail}` : "."}` };
  }
}
