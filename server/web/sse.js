// A text/event-stream reader over a fetch() response body (EventSource cannot send an Authorization header),
// and a job follower that resumes a dropped stream from the last event id (`Last-Event-ID`), with backoff.

const LINE = /\r\n|\r|\n/;

/** Parse an SSE body; calls onEvent({id, event, data}) per dispatched event and onBytes() per chunk. */
export async function readEvents(body, onEvent, onBytes = () => {}) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let event = { id: null, event: "message", data: [] };
  const line = (text) => {
    if (text === "") {
      if (event.data.length) onEvent({ id: event.id, event: event.event, data: event.data.join("\n") });
      event = { id: null, event: "message", data: [] };
      return;
    }
    if (text.startsWith(":")) return; // keep-alive comment
    const colon = text.indexOf(":");
    const name = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "data") event.data.push(value);
    else if (name === "event") event.event = value;
    else if (name === "id" && !value.includes("\0")) event.id = value;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    onBytes();
    buffer += decoder.decode(value, { stream: true });
    // A trailing "\r" may be the first half of "\r\n": hold it back until the next chunk.
    const held = buffer.endsWith("\r") ? "\r" : "";
    const parts = (held ? buffer.slice(0, -1) : buffer).split(LINE);
    buffer = parts.pop() + held;
    parts.forEach(line);
  }
  buffer += decoder.decode();
  if (buffer) buffer.split(LINE).forEach(line);
}

const BACKOFF_MS = [250, 500, 1000, 2000, 4000, 8000];
const MAX_FAILURES = 10; // consecutive failed reconnects before giving up (about a minute)
const STALL_MS = 45000; // the server sends a keep-alive comment every 15 s; silence this long means a dead link
const RETRYABLE = new Set([408, 425, 429, 500, 502, 503, 504]);
const TERMINAL = new Set(["completed", "failed", "cancelled"]);

/** An HTTP error answer, with the API's JSON error body when there is one. */
export class HttpError extends Error {
  constructor(status, body, retryAfter) {
    super(`HTTP ${status}`);
    this.status = status;
    this.body = body;
    this.retryAfter = retryAfter;
  }

  static async from(response) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      // not JSON: the status alone must do
    }
    return new HttpError(response.status, body, response.headers.get("Retry-After"));
  }
}

/** Event ids order the events of a job: Redis stream ids ("ms-seq") or plain counters. */
export function compareIds(a, b) {
  try {
    const [a1, a2 = "0"] = a.split("-");
    const [b1, b2 = "0"] = b.split("-");
    const d = BigInt(a1) - BigInt(b1) || BigInt(a2) - BigInt(b2);
    return d > 0n ? 1 : d < 0n ? -1 : 0;
  } catch {
    return a === b ? 0 : 1; // not numeric: only equality is known
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * Follows one job's event stream to its terminal event. The first connection is opened by the caller's
 * `openFirst(signal)` (the POST that submits the job); after a drop it reconnects to `eventsUrl(jobId)` with
 * `Last-Event-ID`, so no event is lost or repeated. A stream that drops before it named its job is opened
 * again with `openFirst` only when that is `idempotent` (a POST with an Idempotency-Key).
 */
export class JobStream {
  constructor({ eventsUrl, headers, onEvent, onState, idempotent = false }) {
    Object.assign(this, { eventsUrl, headers, onEvent, onState, idempotent });
    this.jobId = null;
    this.lastId = null;
    this.terminal = false;
    this.stopped = false;
    this.reconnects = 0;
    this.duplicates = 0;
    this.ctrl = null;
  }

  /** Close the current connection as a network failure would (the stream then resumes). */
  drop() {
    this.ctrl?.abort();
  }

  /** Stop following for good. */
  stop() {
    this.stopped = true;
    this.ctrl?.abort();
  }

  async run(openFirst) {
    let failures = 0;
    let open = openFirst;
    let established = false; // a stream was opened: the job exists
    while (!this.stopped && !this.terminal) {
      if (!open) {
        const again = established && this.idempotent && openFirst;
        if (!this.jobId && !again) throw new Error("The connection dropped before the server named the job.");
        if (failures > MAX_FAILURES) throw new Error(`Lost the connection to the server (${failures} tries).`);
        const delay = BACKOFF_MS[Math.min(failures, BACKOFF_MS.length) - 1] ?? 0;
        this.onState("reconnecting", { attempt: failures, delay });
        await sleep(delay);
        if (this.stopped) return;
        open = this.jobId ? (signal) => this.resume(signal) : openFirst;
      }
      const first = open === openFirst;
      const ctrl = (this.ctrl = new AbortController());
      let response;
      try {
        response = await open(ctrl.signal);
      } catch (err) {
        if (this.stopped) return;
        if (first && !established) throw err; // whether the POST created a job is unknown
        open = null;
        failures += 1;
        continue;
      }
      open = null;
      if (!response.ok) {
        if (first || !RETRYABLE.has(response.status)) throw await HttpError.from(response);
        failures += 1;
        continue;
      }
      if (response.status === 204) {
        this.terminal = true; // the stream had ended before this request: nothing more will come
        return;
      }
      if (!(response.headers.get("Content-Type") ?? "").includes("text/event-stream")) {
        const job = await response.json().catch(() => ({})); // a 202 with the job instead of its stream
        this.jobId ??= job.id ?? null;
        continue;
      }
      established = true;
      this.onState("connected", { resumed: !first });
      if (await this.read(response, ctrl, () => (failures = 0))) return;
      if (!this.terminal) {
        failures += 1;
        this.reconnects += 1;
      }
    }
  }

  resume(signal) {
    const headers = { ...this.headers(), Accept: "text/event-stream" };
    if (this.lastId !== null) headers["Last-Event-ID"] = this.lastId;
    return fetch(this.eventsUrl(this.jobId), { headers, signal, cache: "no-store" });
  }

  /** Read one connection to its end; true when following stopped for good. */
  async read(response, ctrl, onProgress) {
    let lastByte = Date.now();
    const watchdog = setInterval(() => Date.now() - lastByte > STALL_MS && ctrl.abort(), 1000);
    try {
      await readEvents(
        response.body,
        (event) => {
          onProgress();
          this.dispatch(event, ctrl);
        },
        () => (lastByte = Date.now()),
      );
    } catch {
      // aborted (drop, stall, stop, terminal event) or a network failure: the loop decides
    } finally {
      clearInterval(watchdog);
    }
    return this.stopped;
  }

  dispatch(event, ctrl) {
    if (this.terminal) return;
    if (event.id !== null) {
      if (this.lastId !== null && compareIds(event.id, this.lastId) <= 0) {
        this.duplicates += 1; // the server repeated an event: skip it
        return;
      }
      this.lastId = event.id;
    }
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      data = { text: event.data };
    }
    this.jobId ??= data.job_id ?? null;
    if (TERMINAL.has(event.event)) {
      this.terminal = true;
      setTimeout(() => ctrl.abort(), 0); // the server closes the stream too; don't wait for it
    }
    try {
      this.onEvent(event.event, data, event.id);
    } catch (err) {
      console.error("rendering event", event.event, err);
    }
  }
}
