// What the page shows of one job: the status line, one card per image round (the thought that leads to the
// image, its progress bar and the image), the job's facts (id, seed ...) and, once it ends, its timings.

const STAGE_NAMES = {
  prefill: "Read the prompt",
  thinking: "Thinking",
  reflection: "Reflection",
  image: "Denoising",
  decode: "VAE decode",
  reencode: "Re-encode image",
  answer: "Answer",
};

const seconds = (s) => (s < 10 ? `${s.toFixed(2)} s` : `${s.toFixed(1)} s`);

/** The title of image round k of n ("Draft", "Final image", "Draft 2" ...). */
export function roundTitle(k, n) {
  if (n === 1) return "Image";
  if (k === n) return "Final image";
  return n === 2 ? "Draft" : `Draft ${k}`;
}

export class TrajectoryView {
  constructor(doc) {
    this.doc = doc;
    this.statusEl = doc.getElementById("status");
    this.factsEl = doc.getElementById("facts");
    this.errorEl = doc.getElementById("run-error");
    this.roundsEl = doc.getElementById("rounds-view");
    this.timingsEl = doc.getElementById("timings");
    this.template = doc.getElementById("round-template");
    this.cards = new Map();
    this.blobUrls = [];
  }

  /** Start over for a job of `rounds` images of width x height; `mode` direct has no text. `input`: a URL of
   * the input image (an edit or a question), shown first; `answer`: a question, whose answer streams in. */
  reset({ rounds, width, height, mode, input = null, answer = false }) {
    this.blobUrls.forEach((url) => URL.revokeObjectURL(url));
    this.blobUrls = [];
    this.cards.clear();
    this.roundsEl.replaceChildren();
    Object.assign(this, { rounds, width, height, mode });
    this.answerEl = null;
    this.roundsEl.dataset.count = rounds + (input ? 1 : 0) + (answer ? 1 : 0);
    this.roundsEl.classList.toggle("with-input", Boolean(input));
    if (input) {
      const el = this.doc.getElementById("input-template").content.firstElementChild.cloneNode(true);
      el.querySelector("img").src = input;
      this.roundsEl.append(el);
    }
    if (answer) {
      const el = this.doc.getElementById("answer-template").content.firstElementChild.cloneNode(true);
      this.answerEl = el.querySelector(".answer-text");
      this.answerState = el.querySelector(".round-state");
      this.answerState.textContent = "Waiting…";
      this.roundsEl.append(el);
    }
    for (let k = 1; k <= rounds; k++) this.card(k);
    this.timingsEl.hidden = true;
    this.error(null);
    this.factsEl.replaceChildren();
  }

  /** A piece of the streamed answer. */
  appendAnswer(piece) {
    if (!this.answerEl) return;
    this.answerEl.textContent += piece;
    this.answerState.textContent = "Answering…";
  }

  /** The whole answer; false when it differs from what streamed in. */
  finishAnswer(whole) {
    if (!this.answerEl) return true;
    const same = this.answerEl.textContent === whole;
    this.answerEl.textContent = whole;
    this.answerState.textContent = "Done";
    return same;
  }

  card(k) {
    if (this.cards.has(k)) return this.cards.get(k);
    const el = this.template.content.firstElementChild.cloneNode(true);
    const q = (sel) => el.querySelector(sel);
    const card = {
      el,
      text: q(".thought-text"),
      img: q("img"),
      placeholder: q(".placeholder"),
      bar: q("progress"),
      barLabel: q(".progress-label"),
      state: q(".round-state"),
    };
    el.dataset.round = k;
    el.dataset.kind = k === this.rounds ? "final" : "draft";
    q(".round-number").textContent = k;
    q(".round-title").textContent = roundTitle(k, Math.max(this.rounds, k));
    q(".round-title").id = `round-${k}-title`;
    el.setAttribute("aria-labelledby", `round-${k}-title`);
    q(".thought-title").textContent = k === 1 ? "Thinking" : "Reflection";
    q(".thought").hidden = this.mode === "direct";
    card.text.setAttribute("aria-label", k === 1 ? "Thinking text" : `Reflection before round ${k}`);
    q(".frame").style.aspectRatio = `${this.width} / ${this.height}`;
    q(".frame").classList.toggle("tiny", Math.max(this.width, this.height) <= 128); // show its pixels, unblurred
    card.placeholder.textContent = k === 1 ? "Waiting for the plan…" : "Waiting for the reflection…";
    if (this.mode === "direct") card.placeholder.textContent = "Waiting to start…";
    card.bar.setAttribute("aria-label", `${roundTitle(k, this.rounds)}: denoising progress`);
    this.cards.set(k, card);
    this.roundsEl.append(el);
    return card;
  }

  status(text, tone = "busy") {
    this.said = text;
    this.statusEl.textContent = text;
    this.statusEl.dataset.tone = tone;
  }

  /** A passing remark in the status line (the next status() replaces it; `said` keeps the last status). */
  notice(text) {
    this.statusEl.textContent = text;
  }

  /** No trajectory (the job was never queued). */
  clear() {
    this.roundsEl.replaceChildren();
    this.cards.clear();
  }

  facts(entries) {
    const items = entries.filter(([, value]) => value !== undefined && value !== null && value !== "");
    this.factsEl.replaceChildren(
      ...items.map(([term, value]) => {
        const group = this.doc.createElement("div");
        const dt = this.doc.createElement("dt");
        const dd = this.doc.createElement("dd");
        dt.textContent = term;
        dd.textContent = value;
        group.append(dt, dd);
        return group;
      }),
    );
  }

  error(message) {
    this.errorEl.hidden = !message;
    this.errorEl.textContent = message ?? "";
  }

  /** Add streamed text to round k's thought, following it down unless the reader scrolled up. */
  appendText(k, piece) {
    const { text, state } = this.card(k);
    const follow = text.scrollHeight - text.scrollTop - text.clientHeight < 24;
    text.setAttribute("aria-busy", "true");
    text.append(piece);
    state.textContent = k === 1 ? "thinking…" : "reflecting…";
    if (follow) text.scrollTop = text.scrollHeight;
  }

  /** The whole thought of round k; true when the streamed pieces already said exactly this. */
  finishText(k, whole, truncated = false) {
    const { text, state } = this.card(k);
    const same = text.textContent === whole;
    if (!same) text.textContent = whole;
    text.setAttribute("aria-busy", "false");
    text.classList.toggle("empty", !whole);
    // a thought that reached the token limit without ending is fed back as cut: say so (app.css)
    text.toggleAttribute("data-truncated", truncated);
    state.textContent = "";
    return same;
  }

  progress(k, step, steps) {
    const { bar, barLabel, state, placeholder } = this.card(k);
    bar.max = steps;
    bar.value = step;
    barLabel.textContent = `${step} / ${steps}`;
    state.textContent = "drawing…";
    placeholder.textContent = `Denoising · step ${step} of ${steps}`;
  }

  /** Show a preview of round k while it is denoised (a data: URL); the finished image replaces it. */
  preview(k, src, step, steps) {
    const { img, placeholder, el } = this.card(k);
    if (el.classList.contains("has-image")) return;
    img.alt = `Preview of round ${k} at step ${step} of ${steps}`;
    img.src = src;
    img.hidden = false;
    img.classList.add("preview");
    placeholder.hidden = true;
    el.dataset.previewStep = step;
  }

  /** Show round k's image from a blob URL (made by the caller, revoked on reset). */
  image(k, src, alt) {
    const { img, placeholder, bar, barLabel, state, el } = this.card(k);
    img.classList.remove("preview");
    delete el.dataset.previewStep;
    this.blobUrls.push(src);
    img.alt = alt;
    img.src = src;
    img.hidden = false;
    placeholder.hidden = true;
    bar.value = bar.max; // full, even when progress events were skipped
    barLabel.textContent = "done";
    state.textContent = "";
    el.classList.add("has-image");
  }

  imageError(k, message) {
    const { placeholder, state } = this.card(k);
    placeholder.textContent = message;
    state.textContent = "";
  }

  /** Mark unfinished rounds as stopped (cancelled or failed jobs). */
  halt(word) {
    for (const card of this.cards.values()) {
      if (!card.el.classList.contains("has-image")) {
        card.placeholder.textContent = word;
        card.state.textContent = "";
        card.el.classList.add("halted");
      }
      card.text.setAttribute("aria-busy", "false");
    }
  }

  /** The finished job's timings: queue wait, each stage with its share of the run, the total. */
  timings(timings = {}) {
    const stages = timings.stages ?? [];
    if (!stages.length && timings.run_seconds == null) return;
    const body = this.timingsEl.querySelector("tbody");
    const foot = this.timingsEl.querySelector("tfoot");
    const longest = Math.max(...stages.map((s) => s.seconds), 1e-9);
    const row = (cells, barShare) => {
      const tr = this.doc.createElement("tr");
      cells.forEach((value, i) => {
        const td = this.doc.createElement(i === 0 ? "th" : "td");
        if (i === 0) td.scope = "row";
        if (i === 3) {
          td.className = "bar-col";
          const bar = this.doc.createElement("span");
          bar.className = "bar";
          bar.style.width = `${Math.max(2, Math.round(100 * (barShare ?? 0)))}%`;
          if (barShare != null) td.append(bar);
        } else {
          td.textContent = value;
        }
        tr.append(td);
      });
      return tr;
    };
    body.replaceChildren(
      ...stages.map((s) => {
        const work = s.tokens ? `${s.tokens} tokens` : s.steps ? `${s.steps} steps` : "";
        const round = s.round > 0 ? s.round : "–";
        return row([STAGE_NAMES[s.stage] ?? s.stage, round, seconds(s.seconds), null, work], s.seconds / longest);
      }),
    );
    const totals = [];
    const total = (label, s) => s != null && totals.push(row([label, "", seconds(s), null, ""]));
    total("Waited in queue", timings.queued_seconds);
    total("Whole run", timings.run_seconds);
    foot.replaceChildren(...totals);
    this.timingsEl.hidden = false;
  }
}
