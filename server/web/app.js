// The page's controller: reads the form, submits the job, follows its event stream and hands each event to the
// view. Everything is plain browser JavaScript (no build step); the API is the one in API.md.

import { clearProblems, describe as describeError, readForm, showProblems } from "./form.js";
import { HttpError, JobStream } from "./sse.js";
import { TrajectoryView } from "./view.js";

const API = "v1/generations"; // relative, so the page also works behind a path prefix
const KEY_STORAGE = "irg.apiKey";
const JOB_HASH = /^#(gen_[A-Za-z0-9_-]{1,64})$/;
const ENDED = ["succeeded", "failed", "cancelled"];

const $ = (id) => document.getElementById(id);
const form = $("form");
const view = new TrajectoryView(document);
let current = null; // the job being followed: { stream, state, cancelWanted, timer }
let busy = false; // following a job
let blockedUntil = 0; // after a 429, Generate waits for Retry-After

/** Hooks for the browser test (and for curious people): see tests/web/test_page.py. */
const debug = (window.irgDebug = {
  validate: true, // false: send the form as typed, so the server's own 422 shows
  dropEvery: 0, // > 0: drop the connection after every this many events, as a flaky network would
  dropOnOpen: false, // true: drop the next submission's stream before its first event (it is POSTed again)
  dropStream: () => current?.stream.drop(),
  state: null,
});

// -- requests -----------------------------------------------------------------------------------------

function authHeaders() {
  const key = $("api_key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function getJSON(path) {
  const response = await fetch(path, { headers: authHeaders(), cache: "no-store" });
  if (!response.ok) throw await HttpError.from(response);
  return response.json();
}

// -- the form -----------------------------------------------------------------------------------------

const describe = (err) => describeError(err, Boolean(authHeaders().Authorization));
const problems = (list, summary) => showProblems(form, $("form-error"), list, summary);

function setBusy(value) {
  busy = value;
  $("submit").disabled = busy || Date.now() < blockedUntil;
  const label = $("submit").dataset.label ?? "Generate";
  $("submit").textContent = busy ? (label === "Ask" ? "Asking…" : "Generating…") : label;
  $("cancel").disabled = !busy;
}

/** A 429: say so, and count down to when the queue may have room. */
function queueFull(message, retryAfter) {
  const box = $("form-error");
  blockedUntil = Date.now() + retryAfter * 1000;
  const tick = () => {
    const left = Math.ceil((blockedUntil - Date.now()) / 1000);
    box.textContent = left > 0 ? `${message} Retry in ${left} s.` : `${message} Try again now.`;
    if (left <= 0) {
      clearInterval(timer);
      setBusy(busy);
    }
  };
  const timer = setInterval(tick, 1000);
  box.hidden = false;
  tick();
}

// -- following a job ----------------------------------------------------------------------------------

/** Follow a job's stream: opened by `openFirst` (the POST), or from the start when `jobId` is known. */
async function follow(openFirst, jobId) {
  current?.stream.stop();
  clearInterval(current?.timer);
  const state = { jobId, status: "submitting", posts: 0, events: [], deltas: {}, texts: {}, images: {}, mismatches: 0 };
  const stream = new JobStream({
    idempotent: true, // submissions carry an Idempotency-Key
    eventsUrl: (id) => `${API}/${id}/events`,
    headers: authHeaders,
    onEvent: (type, data, id) => onEvent(run, type, data, id),
    onState: (what, info) => {
      if (what === "reconnecting" && info.attempt) view.notice(`Connection lost; reconnecting (try ${info.attempt})…`);
      if (what === "connected" && info.resumed) view.status(view.said, view.statusEl.dataset.tone);
    },
  });
  stream.jobId = jobId;
  const started = performance.now();
  const run = { stream, state, cancelWanted: false, started: false };
  const tick = () => ($("elapsed").textContent = `${((performance.now() - started) / 1000).toFixed(1)} s elapsed`);
  run.timer = setInterval(tick, 100);
  current = run;
  debug.state = Object.defineProperties(state, {
    reconnects: { get: () => stream.reconnects, enumerable: true },
    duplicates: { get: () => stream.duplicates, enumerable: true },
  });
  setBusy(true);
  if (jobId) onJobId(run, jobId);
  try {
    await stream.run(openFirst);
    if (!stream.stopped && !ENDED.includes(state.status)) await settle(run);
  } catch (err) {
    const { message, field, retryAfter } = describe(err);
    state.status = "error";
    state.error = message;
    if (field === "api_key") $("key-field").hidden = false;
    if (retryAfter) {
      view.status("Not submitted: the queue is full.", "error");
      queueFull(message, retryAfter);
    } else if (field && form.elements[field]) {
      view.status(`Not submitted: check ${field === "api_key" ? "the API key" : "the highlighted field"}.`, "error");
      problems([[field, message]], message);
    } else {
      view.status(stream.jobId ? "Lost track of the job." : "Not submitted.", "error");
      view.error(message);
    }
    if (stream.jobId) view.halt("Stopped");
    else view.clear(); // nothing was queued: no trajectory to show
  } finally {
    if (current === run) {
      clearInterval(run.timer);
      if (stream.jobId) tick();
      else $("elapsed").textContent = "";
      setBusy(false);
    }
  }
}

/** The stream ended without its last event reaching us: take the ending from the job itself. */
async function settle(run) {
  const job = await getJSON(`${API}/${run.state.jobId}`);
  const type = { succeeded: "completed", failed: "failed", cancelled: "cancelled" }[job.status];
  if (!type) throw new Error(`The event stream ended while the job was ${job.status}.`);
  onEvent(run, type, type === "completed" ? job : { error: job.error }, null);
}

function onJobId(run, id) {
  run.state.jobId = id;
  history.replaceState(null, "", `#${id}`);
  if (run.cancelWanted) cancel();
  getJSON(`${API}/${id}`).then((job) => showFacts(job), () => {});
}

function showFacts(job) {
  const p = job.params ?? {};
  view.facts([
    ["Job", job.id],
    ["Seed", p.seed],
    ["Size", p.width ? `${p.width} × ${p.height}` : undefined],
    ["Task", p.task === "understand" ? "question" : p.edit ? "edit" : undefined],
    ["Steps", p.steps || undefined],
    ["Mode", p.mode && (p.mode === "irg" ? `irg, ${p.rounds} rounds` : p.mode)],
  ]);
}

function onEvent(run, type, data, id) {
  const { state, stream } = run;
  if (id !== null && id !== undefined) state.events.push({ id, type }); // live events (previews) carry no id
  if (stream.jobId && !state.jobId) onJobId(run, stream.jobId);
  const k = data.round ?? 1;
  const textKey = `${type.split(".")[0]}-${k}`; // thinking-1, reflection-2 ...
  const title = (round) => (view.card(round).el.querySelector(".round-title").textContent || "image").toLowerCase();
  switch (type) {
    case "queued":
      state.status = "queued";
      view.status(data.position ? `Queued: position ${data.position}.` : "Queued.");
      break;
    case "started":
      if (run.started) view.reset({ rounds: view.rounds, width: view.width, height: view.height, mode: view.mode });
      run.started = true;
      state.status = "running";
      view.status(data.worker ? `Running (worker ${data.worker}).` : "Running.");
      break;
    case "thinking.delta":
    case "reflection.delta":
      state.deltas[textKey] = (state.deltas[textKey] ?? "") + data.text;
      view.appendText(k, data.text);
      view.status(k === 1 ? "Thinking: writing the plan…" : `Reflecting on the ${title(k - 1)}…`);
      break;
    case "thinking.done":
    case "reflection.done":
      state.texts[textKey] = data.text;
      if (!view.finishText(k, data.text, data.truncated === true)) state.mismatches += 1;
      break;
    case "image.progress":
      view.progress(k, data.step, data.steps);
      view.status(`Drawing the ${title(k)}: step ${data.step} of ${data.steps}.`);
      break;
    case "image.preview": // ephemeral: the image forming (x0 estimate), replaced by image.done
      if (!state.images[k] && data.b64) {
        view.preview(k, `data:image/${data.format ?? "jpeg"};base64,${data.b64}`, data.step, data.steps);
        state.previews = (state.previews ?? 0) + 1;
      }
      break;
    case "stream.resumed": // previews sent while disconnected are not replayed; durable events are
      break;
    case "image.done":
      loadImage(run, k, data);
      view.status(`The ${title(k)} is ready.`);
      break;
    case "answer.delta":
      state.deltas.answer = (state.deltas.answer ?? "") + data.text;
      view.appendAnswer(data.text);
      view.status("Answering…");
      break;
    case "answer.done":
      state.texts.answer = data.text;
      if (!view.finishAnswer(data.text)) state.mismatches += 1;
      break;
    case "completed":
      finish(run, data.job ?? data);
      break;
    case "failed":
      state.status = "failed";
      state.error = data.error?.message ?? "unknown error";
      view.status("Failed.", "error");
      view.error(`The job failed: ${state.error}${data.error?.code ? ` (${data.error.code})` : ""}.`);
      view.halt("Not drawn: the job failed");
      break;
    case "cancelled":
      state.status = "cancelled";
      view.status("Cancelled.", "idle");
      view.halt("Cancelled");
      break;
  }
  if (debug.dropEvery > 0 && state.events.length % debug.dropEvery === 0) stream.drop();
}

/** Images are fetched (with the API key, which <img src> cannot send) and shown from blob URLs. */
async function loadImage(run, k, data) {
  const { state } = run;
  if (state.images[k]) return;
  state.images[k] = "loading";
  try {
    const response = await fetch(data.url, { headers: authHeaders() });
    if (!response.ok) throw await HttpError.from(response);
    const blob = await response.blob();
    if (current !== run) return;
    view.image(k, URL.createObjectURL(blob), `${data.kind === "final" ? "Final" : "Draft"} image, round ${k}`);
    state.images[k] = "loaded";
  } catch (err) {
    state.images[k] = "error";
    view.imageError(k, `Could not load the image: ${describe(err).message}`);
  }
}

function finish(run, job) {
  const { state } = run;
  showFacts(job);
  for (const text of job.texts ?? []) {
    const key = `${text.kind}-${text.round}`;
    if (!(key in state.texts)) {
      state.texts[key] = text.text;
      view.finishText(text.round, text.text);
    }
  }
  for (const image of job.images ?? []) loadImage(run, image.round, image);
  if (job.answer && !("answer" in state.texts)) {
    state.texts.answer = job.answer.text;
    view.finishAnswer(job.answer.text);
  }
  view.timings(job.timings);
  state.status = "succeeded";
  const total = job.timings?.run_seconds;
  view.status(total != null ? `Done in ${total.toFixed(1)} s.` : "Done.", "done");
}

// -- actions ------------------------------------------------------------------------------------------

async function submit(event) {
  event.preventDefault();
  clearProblems(form, $("form-error"));
  const { body, problems: wrong } = readForm(form, debug.validate);
  if (wrong.length) {
    problems(wrong);
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, $("api_key").value.trim());
  const task = form.elements.task.value;
  let input = null;
  let size = { width: body.width, height: body.height };
  if (task !== "generate") {
    const file = form.elements.input_image.files[0];
    const { b64, url, width, height } = await readImage(file);
    body.images = [b64];
    input = url;
    size = editSize(width, height);
  }
  const rounds = task === "understand" ? 0 : body.mode === "irg" ? body.rounds : 1;
  view.reset({ rounds, ...size, mode: body.mode, input, answer: task === "understand" });
  view.status("Submitting…");
  // The same Idempotency-Key makes a second POST (after a drop before the job was named) return the same job.
  const headers = { "Content-Type": "application/json", Accept: "text/event-stream", "Idempotency-Key": randomKey() };
  const post = async (signal) => {
    current.state.posts += 1;
    const init = { method: "POST", headers: { ...authHeaders(), ...headers }, body: JSON.stringify(body), signal };
    const response = await fetch(API, init);
    if (debug.dropOnOpen && response.ok) {
      debug.dropOnOpen = false;
      current.stream.drop();
    }
    return response;
  };
  await follow(post, null, body);
}

/** A picked file as base64 (what the API takes), a URL to show it, and its size. */
function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onerror = () => reject(new Error(`Could not read ${file.name}.`));
    reader.onload = () => {
      const dataUrl = reader.result;
      const image = new Image();
      const b64 = dataUrl.slice(dataUrl.indexOf(",") + 1);
      image.onload = () => resolve({ b64, url: dataUrl, width: image.naturalWidth, height: image.naturalHeight });
      image.onerror = () => resolve({ b64, url: dataUrl, width: 1024, height: 1024 }); // the server will say why
      image.src = dataUrl;
    };
    reader.readAsDataURL(file);
  });
}

/** An edit's output size: BAGEL's VAE resize of the input (irg_core/sizes.py), for the cards' aspect ratio. */
function editSize(width, height) {
  const mk = (v) => Math.max(16, Math.round(v / 16) * 16);
  let scale = Math.max(Math.min(1024 / Math.max(width, height), 1), 512 / Math.min(width, height));
  let [w, h] = [mk(width * scale), mk(height * scale)];
  if (Math.max(w, h) > 1024) {
    scale = 1024 / Math.max(w, h);
    [w, h] = [mk(w * scale), mk(h * scale)];
  }
  return { width: w, height: h };
}

function randomKey() {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

async function cancel() {
  const run = current;
  if (!run || run.state.status === "cancelled") return;
  $("cancel").disabled = true;
  view.status("Cancelling…");
  if (!run.state.jobId) {
    run.cancelWanted = true; // sent as soon as the server names the job
    return;
  }
  try {
    const response = await fetch(`${API}/${run.state.jobId}`, { method: "DELETE", headers: authHeaders() });
    if (!response.ok) throw await HttpError.from(response);
  } catch (err) {
    view.error(`Could not cancel: ${describe(err).message}`);
    if (current === run && busy) $("cancel").disabled = false;
  }
}

/** Re-attach to the job named in the address (after a reload): its stream is replayed from the start. */
async function attach(id) {
  try {
    const job = await getJSON(`${API}/${id}`);
    const p = job.params;
    view.reset({ rounds: p.rounds, width: p.width, height: p.height, mode: p.mode, answer: p.task === "understand" });
    await follow(null, id);
  } catch (err) {
    const { message, field } = describe(err);
    view.status("Could not open that job.", "error");
    view.error(message);
    if (field === "api_key") $("key-field").hidden = false;
    else history.replaceState(null, "", location.pathname + location.search); // gone: forget it
  }
}

/** Whether the server wants API keys: its OpenAPI schema, like every route but the health checks, answers 401. */
async function probeKeys() {
  try {
    const response = await fetch("openapi.json", { cache: "no-store" });
    if (response.status === 401) $("key-field").hidden = false;
  } catch {
    // unreachable: checkHealth says so
  }
}

async function checkHealth() {
  const el = $("health");
  try {
    const response = await fetch("readyz", { cache: "no-store" });
    const ready = await response.json().catch(() => ({}));
    const workers = ready.workers ? ` · ${ready.workers} worker${ready.workers === 1 ? "" : "s"}` : "";
    el.textContent = response.ok ? `Ready${workers}` : `Not ready: ${ready.reason ?? `HTTP ${response.status}`}`;
    el.dataset.tone = response.ok ? "done" : "error";
  } catch {
    el.textContent = "Server unreachable";
    el.dataset.tone = "error";
  }
}

const MODE_HINTS = {
  irg: "Thinks, draws a draft, reflects on it, then draws the final image (one more draft per extra round).",
  think: "Thinks first, then draws one image (BAGEL's own chain of thought).",
  direct: "Draws one image straight from the prompt, with no text.",
};

// The server's defaults per mode (GET v1/defaults: the model's serving defaults, as a request that leaves a
// field out gets them). A field the user has not typed in shows the chosen mode's default.
const DEFAULT_FIELDS = { width: "width", height: "height", steps: "steps", max_tokens: "max_think_tokens",
  temperature: "temperature" };
let modeDefaults = null;

function applyDefaults() {
  const d = modeDefaults?.[form.elements.mode.value];
  if (!d) return;
  for (const [name, key] of Object.entries(DEFAULT_FIELDS)) {
    const el = form.elements[name];
    if (!el.dataset.edited) el.value = String(d[key]);
  }
}

async function loadDefaults() {
  try {
    modeDefaults = (await getJSON("v1/defaults")).modes;
    applyDefaults();
  } catch {
    // unreachable or needs a key: the form keeps the values it has
  }
}

const TASK_HINTS = {
  generate: "Draw an image from a text prompt.",
  edit: "Edit the picked image following an instruction; the output size follows the image (BAGEL's rule).",
  understand: "Ask a question about the picked image; the answer streams in (Think: BAGEL's reasoning prompt).",
};

function syncMode() {
  const task = form.elements.task.value;
  const mode = form.elements.mode.value;
  const asking = task === "understand";
  form.elements.mode.querySelector('option[value="irg"]').disabled = asking;
  if (asking && mode === "irg") form.elements.mode.value = "direct";
  const now = form.elements.mode.value;
  form.elements.rounds.disabled = now !== "irg";
  form.elements.max_tokens.disabled = form.elements.temperature.disabled = now === "direct" && !asking;
  form.elements.width.disabled = form.elements.height.disabled = task !== "generate";
  form.elements.steps.disabled = asking;
  $("image-field").hidden = task === "generate";
  $("prompt-label").textContent = { generate: "Prompt", edit: "Instruction", understand: "Question" }[task];
  $("task-hint").textContent = TASK_HINTS[task];
  form.querySelector('label[for="max_tokens"]').textContent = asking ? "Answer tokens" : "Thinking tokens";
  $("submit").dataset.label = asking ? "Ask" : "Generate";
  if (!busy) $("submit").textContent = $("submit").dataset.label;
  $("mode-hint").textContent = asking ? "" : MODE_HINTS[now];
  applyDefaults();
}

for (const name of Object.keys(DEFAULT_FIELDS)) {
  form.elements[name].addEventListener("input", () => { form.elements[name].dataset.edited = "1"; });
}

form.addEventListener("submit", submit);
form.elements.mode.addEventListener("change", syncMode);
form.elements.task.addEventListener("change", syncMode);
$("cancel").addEventListener("click", cancel);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit();
});
const savedKey = sessionStorage.getItem(KEY_STORAGE);
if (savedKey) {
  $("api_key").value = savedKey;
  $("key-field").hidden = false;
}
syncMode();
loadDefaults();
probeKeys();
checkHealth();
setInterval(checkHealth, 15000);
const match = JOB_HASH.exec(location.hash);
if (match) attach(match[1]);
