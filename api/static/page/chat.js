// The chat page at `/`: one prompt, its answer streamed, resumed after drops and reloads.
//
// Model output is only ever assigned to `textContent`: it is shown as text, whatever it holds.
// `document.body.dataset.state` tells where the page is (idle, streaming, complete, failed,
// cancelled, error): the browser tests wait on it.
import { createClient, StreambridgeError } from "/streambridge.js";

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

function show(prompt) {
  leftQueue();
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

function connection({ state, delay }) {
  const was = document.body.dataset.connection;
  if (state === "reconnecting" && was !== "reconnecting") status("connection lost: reconnecting");
  if (state === "open" && was === "reconnecting") status("reconnected: resuming after the last event received");
  const pill = $("connection");
  pill.hidden = state === "open" || state === "closed" || state === "connecting";
  if (state === "reconnecting") {
    const offline = navigator.onLine === false ? " (offline: waiting for the network)" : "";
    say("connection", `reconnecting in ${(delay / 1000).toFixed(1)} s${offline}`);
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
    onContent: (_piece, _event, text) => say("answer", text),
    onAttempt: (attempt) => status(`attempt ${attempt}: the earlier attempt's text is replaced`),
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
    },
  };
}

async function ask(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt.trim()) return;
  show(prompt);
  status("sending…");
  setState("streaming");
  try {
    chat = await client.createChat({ message: prompt, model: $("model").value.trim(), meta: { prompt }, ...callbacks() });
    document.body.dataset.chat = chat.id;
    status("queued: waiting for a worker");
  } catch (error) {
    $("progress").hidden = true;
    fail(`Could not start the chat: ${error.message}`);
    setState("error");
  }
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

// BATCH VIEW (not built yet): upload JSONL, a live progress bar, download the results. It lands with
// /v1/batches (another branch): fill <section id="batches"> in index.html, following the batch's
// GET /v1/batches/{id}/events as this file follows a chat.

function start() {
  $("ask").addEventListener("submit", ask);
  $("cancel").addEventListener("click", cancel);
  const saved = client.savedChat();
  if (saved) {
    // A reload mid-answer: the text so far comes from the store, the rest from after its last event.
    show(saved.meta?.prompt ?? "");
    $("prompt").value = saved.meta?.prompt ?? "";
    setState("streaming");
    chat = client.resumeChat(callbacks());
    document.body.dataset.chat = chat.id;
    say("answer", chat.text);
    status("resuming after a reload…");
    document.body.dataset.resumed = "true";
  } else {
    setState("idle");
  }
}

start();
