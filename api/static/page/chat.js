// The chat page at `/`: one prompt, its answer streamed, resumed after drops and reloads.
//
// Model output is only ever assigned to `textContent`: it is shown as text, whatever it holds.
// `document.body.dataset.state` tells where the page is (idle, streaming, complete, failed,
// cancelled, error): the browser tests wait on it.
import { backoff, createClient, SSEParser, StreambridgeError } from "/streambridge.js";

const $ = (id) => document.getElementById(id);
const client = createClient();
let chat = null;

function setState(state) {
  document.body.dataset.state = state;
  const busy = state === "streaming";
  $("send").disabled = busy;
  $("cancel").disabled = !busy;
}

function say(id, text) {
  $(id).textContent = text;
}

/** The current state in #status, and every state in order in #history (what happened on the way). */
function status(text) {
  say("status", text);
  const item = document.createElement("li");
  item.textContent = text;
  $("history").append(item);
}

/** The answer as one text node: a piece is appended to it (not the whole text redrawn per event). */
function setAnswer(text) {
  const node = document.createTextNode(text);
  $("answer").replaceChildren(node);
  return node;
}

let answerNode = null;

function appendAnswer(piece) {
  if (answerNode === null || answerNode.parentNode !== $("answer")) answerNode = setAnswer("");
  answerNode.appendData(piece);
}

/** What the chat holds now (a superseded attempt's text gone, the final text at the end), drawn whole. */
function drawParts({ text, reasoning, toolCalls }) {
  answerNode = setAnswer(text);
  $("reasoning-box").hidden = !reasoning;
  say("reasoning", reasoning);
  $("tool-calls").hidden = !toolCalls.length;
  say("tool-calls", toolCalls.map((c) => `tool call ${c.function.name}(${c.function.arguments})`).join("\n"));
}

function show(prompt) {
  leftQueue();
  $("resume").hidden = true;
  delete document.body.dataset.resumable;
  $("chat").hidden = false;
  say("question", prompt);
  for (const id of ["answer", "reasoning", "tool-calls", "progress-text", "error", "history"]) say(id, "");
  $("reasoning-box").hidden = true;
  $("tool-calls").hidden = true;
  $("error").hidden = true;
  $("progress").hidden = false;
}

function fail(message) {
  $("error").hidden = false;
  say("error", message);
}

function connection({ state, delay, retryIn }) {
  const was = document.body.dataset.connection;
  const lost = (s) => s === "reconnecting" || s === "offline";
  if (state === "reconnecting" && !lost(was)) status("connection lost: reconnecting");
  if (state === "offline" && was !== "offline") status("offline: waiting for the network");
  if (state === "open" && lost(was)) status("reconnected: resuming after the last event received");
  const pill = $("connection");
  pill.hidden = state === "open" || state === "closed" || state === "connecting";
  if (state === "reconnecting") say("connection", `reconnecting in ${(delay / 1000).toFixed(1)} s`);
  if (state === "offline") {
    say("connection", `offline: waiting for the network (trying again every ${Math.round(retryIn / 1000)} s)`);
  }
  document.body.dataset.connection = state;
}

/** The chat's place while it waits: #status says it, `data-queue-position` holds it (for the tests);
 * #history gets a line only when the place changes, not at every poll. */
function queued(position) {
  const was = document.body.dataset.queuePosition ?? "";
  const now = position === null ? "" : String(position);
  if (now === was) return;
  document.body.dataset.queuePosition = now;
  if (now) status(`queued — position ${now}`);
}

function leftQueue() {
  delete document.body.dataset.queuePosition;
}

function callbacks() {
  return {
    onContent: (piece) => appendAnswer(piece),
    onAttempt: (attempt) => {
      // the earlier attempt's text, reasoning and tool calls go; this event's own callback draws it next
      drawParts({ text: "", reasoning: "", toolCalls: [] });
      status(`attempt ${attempt}: the earlier attempt's text is replaced`);
    },
    onReasoning: (_piece, _event, reasoning) => {
      $("reasoning-box").hidden = false;
      say("reasoning", reasoning);
    },
    onToolCall: (_event, calls) => {
      $("tool-calls").hidden = false;
      say("tool-calls", calls.map((c) => `tool call ${c.function.name}(${c.function.arguments})`).join("\n"));
    },
    onProgress: (p) => say("progress-text", `${p.chars} characters in ${(p.elapsed_ms / 1000).toFixed(1)} s`),
    onQueued: queued,
    onStatus: (event) => {
      leftQueue();
      status(event.type === "started" ? `running: attempt ${event.attempt} (${event.model})` : event.message);
    },
    onAttemptError: (event) =>
      status(`attempt ${event.attempt} failed: ${event.message}${event.retryable ? "; retrying" : ""}`),
    onConnection: connection,
    onComplete: (result) => {
      leftQueue();
      $("progress").hidden = true;
      drawParts(result); // the answer is the attempt that ended, whatever was drawn on the way
      if (result.status === "cancelled") {
        status("cancelled");
        setState("cancelled");
        return;
      }
      const t = result.terminal;
      status(`done: ${t.content_length} characters in ${(t.elapsed_ms / 1000).toFixed(1)} s (${t.finish_reason})`);
      setState("complete");
    },
    onError: (error) => {
      leftQueue();
      $("progress").hidden = true;
      if (error instanceof StreambridgeError && error.code === "stream_expired") {
        // The live history is gone; the final result is not: show it.
        const result = error.result;
        if (result) say("answer", result.content ?? "");
        status(`history expired: the final result is shown (${result ? result.status : "unknown"})`);
        fail("This chat's live history has expired.");
        setState("error");
        return;
      }
      if (error instanceof StreambridgeError && error.code === "chat_failed") {
        status("failed");
        fail(`The chat failed: ${error.message}`);
        setState("failed");
        return;
      }
      fail(`Error: ${error.message}`);
      setState("error");
      // lost (the network, for minutes): the chat goes on on the server and its record is kept
      if (chat && client.savedChat()?.id === chat.id) offerResume();
    },
  };
}

async function ask(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt.trim()) return;
  show(prompt);
  status("sending…");
  chat = null; // until the new chat exists, Cancel must not reach the last one
  setState("streaming");
  $("cancel").disabled = true;
  try {
    chat = await client.createChat({ message: prompt, model: $("model").value.trim(), meta: { prompt }, ...callbacks() });
    $("cancel").disabled = document.body.dataset.state !== "streaming"; // it may have ended already
    document.body.dataset.chat = chat.id;
    status("queued: waiting for a worker");
  } catch (error) {
    $("progress").hidden = true;
    fail(`Could not start the chat: ${error.message}`);
    setState("error");
  }
}

/** After a give-up: a Resume button, and a resume by itself when the network or the tab comes back. */
function offerResume() {
  status("gave up reconnecting: Resume (or the network coming back) picks the chat up where it stopped");
  $("resume").hidden = false;
  document.body.dataset.resumable = "true";
}

function resume() {
  if (document.body.dataset.resumable !== "true" || document.body.dataset.state === "streaming") return;
  const saved = client.savedChat();
  if (!saved) return;
  delete document.body.dataset.resumable;
  $("resume").hidden = true;
  $("error").hidden = true;
  $("progress").hidden = false;
  setState("streaming");
  chat = client.resumeChat(callbacks());
  drawParts(chat);
  status("resuming…");
}

async function cancel() {
  if (!chat) return;
  $("cancel").disabled = true;
  status("cancelling…");
  try {
    await chat.cancel();
  } catch (error) {
    $("cancel").disabled = false;
    fail(`Could not cancel: ${error.message}`);
  }
}

// The batch view (<section id="batches">): a file run as a batch, its progress followed over
// GET /v1/batches/{id}/events as a chat's is, its results downloaded. Everything shown of it (ids,
// statuses, server messages) goes through textContent, as model output does.
// `#batches[data-state]` tells where it is (idle, uploading, running, then the batch's last status,
// or error), `data-downloads` whether its links are being fetched (pending) or there (ready): the
// browser tests wait on them.
//
// Whose batch: a batch belongs to the visitor that made it, and only that token can see it. So a
// batch keeps the token it was made with (the chat above may make a new visitor meanwhile), and a
// 401 about it is the end of that session, not a reason to make a new visitor (who would get 404).
// A new visitor is made, once, only while starting a batch: upload and create run again under it.

const BATCH_ENDPOINT = "/v1/chat/completions";
// Followed as a chat is: failures in a row (no event between) for this long end the view; time the
// browser is offline is not counted, and while offline it still tries every BATCH_OFFLINE_RETRY_MS.
const BATCH_RETRY_FOR_MS = 5 * 60_000;
const BATCH_OFFLINE_RETRY_MS = 10_000;
// The batch being followed, kept for the tab's life (sessionStorage) so a reload follows it again.
const BATCH_KEY = "streambridge:batch";
let batch = null; // { id, token, stop: AbortController, lastEventId, total }
const batchUrls = {}; // object URLs of the download links, revoked when replaced

function batchState(state) {
  $("batches").dataset.state = state;
  const busy = state === "uploading" || state === "running";
  $("batch-start").disabled = busy;
  $("batch-cancel").disabled = state !== "running";
  $("batch-so-far").hidden = state !== "running"; // once ended, the links below hold the whole files
}

function saveBatch(current) {
  try {
    const { id, token, lastEventId, status } = current;
    sessionStorage.setItem(BATCH_KEY, JSON.stringify({ id, token, lastEventId, status }));
  } catch {
    // storage refused (full, or disabled): a reload cannot follow it again, the view goes on
  }
}

function forgetBatch(current) {
  try {
    if (JSON.parse(sessionStorage.getItem(BATCH_KEY) ?? "null")?.id === current.id) sessionStorage.removeItem(BATCH_KEY);
  } catch {
    // nothing kept
  }
}

function savedBatch() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(BATCH_KEY) ?? "null");
    if (saved && typeof saved.id === "string" && typeof saved.token === "string") return saved;
  } catch {
    // a record this page cannot read
  }
  return null;
}

/** Until the browser's `online` event, `ms` at most, or `signal`'s abort. */
function untilOnline(ms, signal) {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      window.removeEventListener("online", done);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    window.addEventListener("online", done, { once: true });
    signal.addEventListener("abort", done, { once: true });
  });
}

function batchFail(message) {
  $("batch-error").hidden = false;
  say("batch-error", message);
}

/** Is `line` a batch request line (JSON with custom_id and body)? As the CLI's `batch run` decides. */
function isRequest(line) {
  try {
    const value = JSON.parse(line);
    return value !== null && typeof value === "object" && "custom_id" in value && "body" in value;
  } catch {
    return false;
  }
}

/** The file as batch JSONL: sent as given if it is JSONL (a malformed line too: the server names
 * it and fails the batch, where taking it for plain text would send each JSON line as a prompt),
 * else one request per non-blank line, `custom_id` `line-N` with N its line number. */
function toBatchJsonl(text, model) {
  const lines = text.split(/\r\n|\r|\n/);
  const filled = lines.filter((line) => line.trim());
  if (filled.length && (isRequest(filled[0]) || filled.filter(isRequest).length * 2 > filled.length)) return text;
  const out = [];
  lines.forEach((prompt, index) => {
    if (!prompt.trim()) return;
    const body = { messages: [{ role: "user", content: prompt }] };
    if (model) body.model = model;
    out.push(JSON.stringify({ custom_id: `line-${index + 1}`, method: "POST", url: BATCH_ENDPOINT, body }));
  });
  return out.join("\n") + "\n";
}

/** A call as `token`'s owner; an error answer throws, with its `status`. */
async function authorized(token, path, init = {}) {
  const headers = { ...(init.headers ?? {}), Authorization: `Bearer ${token}` };
  const response = await fetch(path, { ...init, headers, cache: "no-store" });
  if (response.status === 401) {
    const error = new Error("your session has expired, and the batch belonged to it (401)");
    throw Object.assign(error, { status: 401 });
  }
  if (!response.ok) throw Object.assign(new Error(await problem(response)), { status: response.status });
  return response;
}

/** Upload and create, as the page's visitor: one made if there is none, and once more (both steps
 * again, the file was the old visitor's) if the kept one has expired. The batch with its owner's token. */
async function startBatch(jsonl, name) {
  if (!client.token) await client.login();
  for (let fresh = false; ; fresh = true) {
    const token = client.token;
    try {
      const form = new FormData();
      form.append("purpose", "batch");
      form.append("file", new Blob([jsonl], { type: "application/jsonl" }), name);
      const uploaded = await (await authorized(token, "/v1/files", { method: "POST", body: form })).json();
      const created = await (
        await authorized(token, "/v1/batches", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ input_file_id: uploaded.id, endpoint: BATCH_ENDPOINT, completion_window: "24h" }),
        })
      ).json();
      return { created, token };
    } catch (error) {
      if (error.status !== 401 || fresh) throw error;
      if (client.token === token) await client.login(); // unless the chat made a new visitor already
    }
  }
}

async function problem(response) {
  const text = await response.text().catch(() => "");
  try {
    const { error } = JSON.parse(text);
    if (error?.message) return `${error.message} (${response.status})`;
  } catch {
    // not the API's JSON error: a proxy's page, say
  }
  return `${response.status} ${text.trim().slice(0, 200) || response.statusText}`;
}

function showCounts({ completed, failed, total }) {
  batch.total = total;
  const progress = $("batch-progress");
  progress.hidden = false;
  progress.max = Math.max(total, 1);
  progress.value = completed + failed;
  say("batch-counts", `${completed + failed} / ${total} done — ${completed} completed, ${failed} failed`);
}

async function runBatch(event) {
  event.preventDefault();
  const file = $("batch-file").files[0];
  if (!file) return;
  batch?.stop.abort();
  batch = null;
  delete $("batches").dataset.reconnects;
  delete $("batches").dataset.downloads;
  for (const id of ["batch-results", "batch-errors"]) $(id).hidden = true;
  $("batch-error").hidden = true;
  say("batch-counts", "");
  $("batch-progress").hidden = true;
  batchState("uploading");
  say("batch-status", `uploading ${file.name}…`);
  try {
    const jsonl = toBatchJsonl(await file.text(), $("model").value.trim());
    const { created, token } = await startBatch(jsonl, file.name.replace(/\.[^.]*$/, "") + ".jsonl");
    const stop = new AbortController();
    batch = { id: created.id, token, status: created.status, stop, lastEventId: null, total: 0 };
    saveBatch(batch);
    $("batches").dataset.batch = created.id;
    say("batch-status", `${created.id}: ${created.status}`);
    batchState("running");
    followBatch(batch);
  } catch (error) {
    batchFail(`Could not start the batch: ${error.message}`);
    batchState("error");
  }
}

/** The events to the `end`, reconnecting after a drop with Last-Event-ID (nothing seen twice or missed),
 * with the chat's jittered backoff (so many pages cut at once do not come back at once).
 * A connection silent past the server's pings (every 15 s at most) is taken for dropped. */
async function followBatch(current) {
  const { signal } = current.stop;
  let failingSince = null; // when the failures in a row began, less the time offline
  for (let failures = 0; !signal.aborted; ) {
    const connection = new AbortController();
    const drop = () => connection.abort();
    signal.addEventListener("abort", drop, { once: true });
    let timer = null;
    const arm = () => {
      clearTimeout(timer);
      timer = setTimeout(drop, 45000);
    };
    try {
      const headers = { Accept: "text/event-stream" };
      if (current.lastEventId) headers["Last-Event-ID"] = current.lastEventId;
      arm();
      const path = `/v1/batches/${encodeURIComponent(current.id)}/events`;
      const response = await authorized(current.token, path, { headers, signal: connection.signal });
      if (failures) say("batch-status", `${current.id}: ${current.status} (reconnected)`);
      const parser = new SSEParser();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        arm();
        for (const message of parser.feed(value)) {
          failures = 0; // progress: the backoff starts again
          failingSince = null;
          if (batchEvent(current, message.event, JSON.parse(message.data))) return;
          if (message.id) current.lastEventId = message.id; // after it is shown: a reload shows it again, never skips it
          if (current === batch) saveBatch(current);
        }
      }
    } catch (error) {
      if (signal.aborted) return;
      // an answer that will not change (the batch is not ours, a bad position): no point retrying
      if (error.status && error.status < 500 && error.status !== 408 && error.status !== 429) {
        batchFail(`Lost the batch's progress: ${error.message}`);
        batchState("error");
        forgetBatch(current);
        return;
      }
    } finally {
      clearTimeout(timer);
      signal.removeEventListener("abort", drop);
    }
    // closed before its `end` (a restart, the network): again after the last event seen, backing off
    if (current !== batch) return; // a newer batch took the view
    failures += 1;
    failingSince ??= Date.now();
    if (failures > 1 && Date.now() - failingSince >= BATCH_RETRY_FOR_MS) {
      batchFail("Lost the batch's progress: the events could not be reached (reload the page to try again)");
      batchState("error");
      return; // kept in the store: a reload follows it again
    }
    $("batches").dataset.reconnects = String(Number($("batches").dataset.reconnects ?? 0) + 1); // for the tests
    if (navigator.onLine === false) {
      say("batch-status", `${current.id}: offline, waiting for the network…`);
      const since = Date.now();
      await untilOnline(BATCH_OFFLINE_RETRY_MS, signal);
      failingSince += Date.now() - since; // time offline is not a failure
      continue;
    }
    say("batch-status", `${current.id}: connection lost, reconnecting…`);
    const delay = backoff(failures, { startMs: 250, maxMs: 15000 });
    $("batches").dataset.lastDelay = String(Math.round(delay)); // for the tests
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
}

/** One event of the batch's stream; true at its `end`. */
function batchEvent(current, type, data) {
  if (current !== batch) return true; // a newer batch took the view
  if (type === "status") {
    current.status = data.status;
    say("batch-status", `${current.id}: ${data.status}`);
  }
  if (type === "item" || type === "end") showCounts(data);
  if (type !== "end") return false;
  say("batch-status", `${current.id}: ${data.status}`);
  batchEnded(current, data.status);
  return true;
}

/** The batch ended: a new one may start at once; its links follow when fetched. Whatever answers
 * after another batch took the view (it was started meanwhile) is dropped, never shown in its place. */
async function batchEnded(current, status) {
  const stale = () => {
    if (current === batch) return false;
    $("batches").dataset.dropped = current.id; // for the tests: its late answer was dropped, not shown
    return true;
  };
  forgetBatch(current);
  batchState(status);
  $("batches").dataset.downloads = "pending";
  try {
    const final = await (await authorized(current.token, `/v1/batches/${encodeURIComponent(current.id)}`)).json();
    if (stale()) return;
    // bad input lines, as the server names them (a failed batch's reasons)
    const refused = (final.errors?.data ?? []).map((e) => `${e.line != null ? `line ${e.line}: ` : ""}${e.message ?? e.code}`);
    if (refused.length) batchFail(refused.join("\n"));
    const results = await fileBlob(current, final.output_file_id);
    const errors = await fileBlob(current, final.error_file_id);
    if (stale()) return;
    offer("batch-results", results, `${current.id}-results.jsonl`);
    offer("batch-errors", errors, `${current.id}-errors.jsonl`);
  } catch (error) {
    if (stale()) return;
    batchFail(`Could not fetch the results: ${error.message}`);
  }
  $("batches").dataset.downloads = "ready";
}

/** The bytes of a file of the batch's, fetched with its owner's token; null if it has none. */
async function fileBlob(current, fileId) {
  if (!fileId) return null;
  return (await authorized(current.token, `/v1/files/${encodeURIComponent(fileId)}/content`)).blob();
}

/** A download link for a Blob (hidden when there is none). */
function offer(id, blob, name) {
  const link = $(id);
  link.hidden = blob === null;
  if (blob === null) return;
  link.href = blobUrl(id, blob);
  link.download = name;
}

function blobUrl(key, blob) {
  if (batchUrls[key]) URL.revokeObjectURL(batchUrls[key]);
  batchUrls[key] = URL.createObjectURL(blob);
  return batchUrls[key];
}

/** The results so far (`/results`: output lines, then error lines), saved while the batch runs. */
async function downloadSoFar() {
  const current = batch;
  if (!current) return;
  try {
    const blob = await (await authorized(current.token, `/v1/batches/${encodeURIComponent(current.id)}/results`)).blob();
    if (current !== batch) return; // another batch took the view meanwhile
    const link = document.createElement("a");
    link.href = blobUrl("so-far", blob);
    link.download = `${current.id}-results-so-far.jsonl`;
    link.click();
  } catch (error) {
    batchFail(`Could not fetch the results so far: ${error.message}`);
  }
}

async function cancelBatch() {
  const current = batch;
  if (!current) return;
  $("batch-cancel").disabled = true;
  try {
    await authorized(current.token, `/v1/batches/${encodeURIComponent(current.id)}/cancel`, { method: "POST" });
    if (current !== batch) return;
    say("batch-status", `${current.id}: cancelling`); // the stream's `end` says when it is cancelled
  } catch (error) {
    if (current !== batch) return;
    $("batch-cancel").disabled = false;
    batchFail(`Could not cancel the batch: ${error.message}`);
  }
}

function startBatchView() {
  $("batches").hidden = false;
  $("batch-form").addEventListener("submit", runBatch);
  $("batch-cancel").addEventListener("click", cancelBatch);
  $("batch-so-far").addEventListener("click", downloadSoFar);
  batchState("idle");
  const saved = savedBatch();
  if (saved) {
    // a reload while a batch ran: follow it again after the last event shown (it replays its counts)
    batch = { ...saved, status: saved.status ?? "in_progress", stop: new AbortController(), total: 0 };
    $("batches").dataset.batch = batch.id;
    $("batches").dataset.resumed = "true";
    say("batch-status", `${batch.id}: ${batch.status} (following again after a reload)`);
    batchState("running");
    showSavedCounts(batch);
    followBatch(batch);
  }
}

/** The counts as the batch object has them, until its next event brings them (best effort). */
async function showSavedCounts(current) {
  try {
    const info = await (await authorized(current.token, `/v1/batches/${encodeURIComponent(current.id)}`)).json();
    const counts = info.request_counts;
    if (current === batch && counts && !$("batch-counts").textContent) showCounts(counts);
  } catch {
    // the events say it soon enough
  }
}

function start() {
  startBatchView();
  $("ask").addEventListener("submit", ask);
  $("cancel").addEventListener("click", cancel);
  $("resume").addEventListener("click", resume);
  window.addEventListener("online", resume);
  document.addEventListener("visibilitychange", () => document.visibilityState === "visible" && resume());
  const saved = client.savedChat();
  if (saved) {
    // A reload mid-answer: the text so far comes from the store, the rest from after its last event.
    show(saved.meta?.prompt ?? "");
    $("prompt").value = saved.meta?.prompt ?? "";
    setState("streaming");
    chat = client.resumeChat(callbacks());
    document.body.dataset.chat = chat.id;
    drawParts(chat);
    status("resuming after a reload…");
    document.body.dataset.resumed = "true";
  } else {
    setState("idle");
  }
}

start();
