// The JavaScript client used as a page would use it, imported from the path every edge serves.
// The browser tests call these functions and compare what they return with the simulated LLM's text.
import { createClient, createChat, memoryStore, StreambridgeError } from "/streambridge.js";

const after = (a, b) => {
  const [am, as] = a.split("-").map(BigInt);
  const [bm, bs] = b.split("-").map(BigInt);
  return am > bm || (am === bm && as > bs);
};
const log = (line) => (document.getElementById("log").textContent += `${line}\n`);

/** Callbacks only; the fetch transport (a Bearer header on the events route). */
window.streamWithCallbacks = (prompt, model) =>
  new Promise((resolve, reject) => {
    const seen = { content: "", progress: 0, status: [], connection: [] };
    createChat({
      message: prompt,
      model,
      store: memoryStore(),
      transport: "fetch",
      onContent: (piece, _event, text) => {
        seen.content += piece;
        seen.text = text;
      },
      onProgress: () => (seen.progress += 1),
      onStatus: (event) => seen.status.push(event.type),
      onConnection: ({ state }) => seen.connection.push(state),
      onComplete: (result) => {
        log(`callbacks: ${result.status}`);
        resolve({ ...seen, result: { status: result.status, text: result.text, length: result.terminal.content_length } });
      },
      onError: (error) => reject(error),
    }).catch(reject);
  });

/** `for await`, EventSource (the stream_url), and `done`. */
window.streamWithIteration = async (prompt, model) => {
  const client = createClient({ store: memoryStore(), transport: "eventsource" });
  const chat = await client.createChat({ message: prompt, model });
  const types = [];
  let text = "";
  let lastId = null;
  let ordered = true;
  for await (const event of chat) {
    types.push(event.type);
    if (lastId !== null && !after(event.eventId, lastId)) ordered = false;
    lastId = event.eventId;
    if (event.type === "content") text += event.content;
  }
  const result = await chat.done;
  log(`iteration: ${result.status}`);
  return { types, text, ordered, result: { status: result.status, text: result.text }, lastEventId: chat.lastEventId };
};

/** An AbortSignal stops following; the chat itself goes on, and followChat follows it again to its end. */
window.abortAndFollow = async (prompt, model) => {
  const client = createClient({ store: memoryStore() });
  const controller = new AbortController();
  const first = await client.createChat({ message: prompt, model, signal: controller.signal });
  for await (const event of first) {
    if (event.type === "content") break;
  }
  controller.abort();
  let aborted = false;
  try {
    await first.done;
  } catch (error) {
    aborted = error.name === "AbortError";
  }
  const before = first.text;
  const rest = client.followChat({ id: first.id, stream_url: first.streamUrl });
  const result = await rest.done;
  return { aborted, before, whole: result.text };
};

/** An error is a StreambridgeError with the server's code. */
window.followUnknownChat = async () => {
  const client = createClient({ store: memoryStore() });
  await client.login();
  const chat = client.followChat("0123456789abcdef0123456789abcdef");
  try {
    await chat.done;
    return null;
  } catch (error) {
    return { isError: error instanceof StreambridgeError, status: error.status, code: error.code };
  }
};

/** A chat followed to its end; its id and the token that owns it (for the 410 test). */
window.chatToEnd = async (prompt, model) => {
  const client = createClient({ store: memoryStore() });
  const chat = await client.createChat({ message: prompt, model });
  await chat.done;
  return { id: chat.id, token: client.token };
};

/** Following a chat whose history expired: a clear error, holding the final result. */
window.followExpired = async (id, token) => {
  const client = createClient({ store: memoryStore(), token });
  try {
    await client.followChat(id).done;
    return null;
  } catch (error) {
    const result = error.result;
    return { code: error.code, status: error.status, message: error.message, content: result?.content, state: result?.status };
  }
};

/** A chat over EventSource left running: the test cuts the network under it and awaits `finish()`. */
window.startOverEventSource = async (prompt, model, readTimeoutMs) => {
  const states = [];
  const client = createClient({ store: memoryStore(), transport: "eventsource", readTimeoutMs });
  const onConnection = ({ state }) => {
    states.push(state);
    log(`connection: ${state}`); // the screenshots show what happened
  };
  const onContent = (_piece, _event, text) => (document.getElementById("text").textContent = text);
  const chat = await client.createChat({ message: prompt, model, onConnection, onContent });
  log(`chat ${chat.id} over EventSource, read timeout ${readTimeoutMs} ms`);
  window.running = { chat, states };
  return chat.id;
};

window.runningText = () => window.running.chat.text;
window.runningStates = () => window.running.states;

window.finishRunning = async () => {
  const { chat, states } = window.running;
  const result = await chat.done;
  return { text: result.text, reconnects: chat.reconnects, states };
};

document.body.dataset.ready = "true";
