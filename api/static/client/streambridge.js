// streambridge.js — the browser's client for streambridge. One ES module, no dependencies, no build step:
//
//   import { createClient } from "/streambridge.js";          // every edge (and `streambridge up`) serves it
//   const client = createClient();                              // same origin; { baseUrl } for another
//   const chat = await client.createChat({ message: "Hello", onContent: (piece, ev, text) => show(text) });
//   const result = await chat.done;                             // or: for await (const ev of chat) { … }
//
// What it guarantees, as the Python client does (streambridge/client.py): every event once, in
// order, across dropped connections (it resumes after the last event id it saw, on any edge), and
// across page reloads (the chat id, last event id and the text so far are kept in sessionStorage,
// or a store you give; `client.resumeChat()` picks the chat up). Types: streambridge.d.ts.

export const VERSION = "0.1.0";

const BACKOFF_START_MS = 100;
// Doubling to 15 s: an edge being redeployed, a VPN that reconnects, a train in a tunnel — minutes
// of failures are normal, and many pages cut at once must not all come back every 2 s.
const BACKOFF_MAX_MS = 15000;
// Failures in a row (no event accepted) for this long end the chat's following with `stream_lost`.
// Time the browser says it is offline is not counted.
const RETRY_FOR_MS = 5 * 60_000;
// While the browser says it is offline, the stream still tries this often: `navigator.onLine` is a
// hint (it can stay false on a network that works), not the truth.
const OFFLINE_RETRY_MS = 10_000;
// The edge sends a comment at least every 15 s; a fetch stream silent for longer than this is dead.
// EventSource hides those comments: there, a silence this long only makes the client ask the API
// whether the chat moved on without it (see viaEventSource).
const READ_TIMEOUT_MS = 45000;
// The persisted record is rewritten at most this often while text streams (and at once at the end).
const PERSIST_EVERY_MS = 250;
// While a chat waits in the queue, its place is asked for after this long at first (one cheap GET
// each time), then less and less often (×1.5 a time, jittered) to at most QUEUE_POLL_MAX_MS: a
// long queue is a busy server, and a thousand waiting pages must not each ask every second.
const QUEUE_POLL_MS = 1000;
const QUEUE_POLL_MAX_MS = 8000;
const ENTRY_ID = /^\d{1,20}-\d{1,20}$/;
const EVENT_TYPES = [
  "started", "content", "reasoning", "tool_call", "progress", "status", "error", "complete", "failed", "cancelled",
];
const TERMINAL = new Set(["complete", "failed", "cancelled"]);

/** Every failure the client reports: an HTTP error body's code and message, or one of its own codes. */
export class StreambridgeError extends Error {
  constructor(status, code, message, { retryAfter = null, result = null, cause = undefined } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "StreambridgeError";
    this.status = status; // the HTTP status; null when there was no answer
    this.code = code; // e.g. "stream_expired", "chat_failed", "stream_lost", "not_found"
    this.retryAfter = retryAfter; // seconds, from Retry-After
    this.result = result; // the chat's final state (GET /v1/chats/{id}) when it is known
  }
}

/** A store in sessionStorage: it lives as long as the tab, survives reloads, and other tabs do not see it. */
export function sessionStore() {
  try {
    const storage = globalThis.sessionStorage;
    storage.getItem("streambridge:probe"); // throws where storage is disabled
    return {
      get: (key) => storage.getItem(key),
      set: (key, value) => storage.setItem(key, value),
      remove: (key) => storage.removeItem(key),
    };
  } catch {
    return memoryStore(); // a sandboxed frame, or no DOM (Node): nothing survives a reload
  }
}

export function memoryStore() {
  const items = new Map();
  return {
    get: (key) => (items.has(key) ? items.get(key) : null),
    set: (key, value) => void items.set(key, value),
    remove: (key) => void items.delete(key),
  };
}

export function createClient(options = {}) {
  return new StreambridgeClient(options);
}

/** One call: a client from `options`, a chat from the same `options`. */
export function createChat(options) {
  return (options.client ?? createClient(options)).createChat(options);
}

export class StreambridgeClient {
  constructor({
    baseUrl = "",
    token = null,
    store = sessionStore(),
    storageKey = "streambridge",
    transport = "auto",
    maxReconnects = Infinity,
    retryForMs = RETRY_FOR_MS,
    readTimeoutMs = READ_TIMEOUT_MS,
    onCallbackError = undefined,
    fetch: fetchImpl = undefined,
  } = {}) {
    this.baseUrl = String(baseUrl).replace(/\/+$/, "");
    this.store = store;
    this.storageKey = storageKey;
    this.transport = transport;
    this.maxReconnects = maxReconnects;
    this.retryForMs = retryForMs;
    this.readTimeoutMs = readTimeoutMs;
    this.onCallbackError = onCallbackError;
    this._fetch = fetchImpl ?? ((...args) => globalThis.fetch(...args));
    this._tokenGiven = token !== null;
    this.token = token ?? (store && store.get(`${storageKey}:token`));
    this._login = null; // the visitor being made: callers at the same time share it (one user, not two)
  }

  /**
   * A new anonymous user (`POST /v1/auth/visitor`); its token is kept for later calls (and in the store).
   * Calls made while one is under way share it. `signal` stops the caller's wait (the visitor, if
   * the server makes it, is still kept: a caller after it needs no other).
   */
  login({ signal } = {}) {
    if (signal?.aborted) return Promise.reject(signal.reason);
    this._login ??= this._request("POST", "/v1/auth/visitor")
      .then((visitor) => {
        this.token = visitor.token;
        this.store?.set(`${this.storageKey}:token`, visitor.token);
        return visitor.token;
      })
      .finally(() => {
        this._login = null;
      });
    return untilAborted(this._login, signal);
  }

  /** Starts a chat and follows its events; see ChatOptions in streambridge.d.ts. */
  async createChat(options) {
    const { message, messages, model, temperature, max_tokens: maxTokens, body: extra } = options;
    if ((message === undefined) === (messages === undefined)) throw new TypeError("give either message or messages");
    const body = { ...extra, ...(messages === undefined ? { message } : { messages }) };
    for (const [name, value] of Object.entries({ model, temperature, max_tokens: maxTokens })) {
      if (value !== undefined && value !== null && value !== "") body[name] = value;
    }
    // One key for every try: a POST whose answer was lost is sent again, and the server returns
    // the chat the first one made rather than starting a second.
    // A caller's key (`idempotencyKey`) makes two calls one chat: React's StrictMode runs an effect twice.
    const headers = { "Idempotency-Key": options.idempotencyKey ?? randomKey() };
    const { signal } = options;
    signal?.throwIfAborted();
    if (!this.token) await this.login({ signal });
    // The POST itself is not aborted with `signal`: once sent, it may have made the chat, and an
    // aborted fetch would never say. After an abort it finishes in the background and the chat it
    // made is cancelled, so no chat runs that no one can reach — unless the caller gave the
    // Idempotency-Key: then a call with the same key (StrictMode's second run) gets that chat back.
    const creating = this._createOrLogin(body, headers, signal);
    let created;
    try {
      created = await untilAborted(creating, signal);
    } catch (error) {
      if (signal?.aborted) {
        const cancel = options.idempotencyKey === undefined;
        creating.then((made) => cancel && this.cancelChat(made.id)).catch(() => {});
      }
      throw error;
    }
    return this.followChat(created, options);
  }

  async _createOrLogin(body, headers, signal) {
    try {
      return await this._create(body, headers, signal);
    } catch (error) {
      if (!(error instanceof StreambridgeError && error.status === 401) || this._tokenGiven || signal?.aborted) {
        throw error;
      }
      await this.login({ signal }); // the kept visitor token expired: a new visitor, once
      return this._create(body, headers, signal);
    }
  }

  /** Follows a chat already created: `{ id, stream_url }` (as POST /v1/chats answers) or its id. */
  followChat(chat, options = {}) {
    const ref = typeof chat === "string" ? { id: chat } : chat;
    return new ChatStream(this, { id: ref.id, streamUrl: ref.stream_url ?? null }, options);
  }

  /** The chat this tab was following when it was reloaded, resumed where it stopped; null if there is none. */
  resumeChat(options = {}) {
    const saved = this.savedChat();
    if (saved === null) return null;
    return new ChatStream(this, saved, options);
  }

  /** The record `resumeChat` would resume, with the `meta` given to createChat; null if none. */
  savedChat() {
    const raw = this.store?.get(`${this.storageKey}:chat`);
    if (!raw) return null;
    try {
      const saved = JSON.parse(raw);
      if (typeof saved.id === "string" && (saved.lastEventId === null || ENTRY_ID.test(saved.lastEventId))) return saved;
    } catch {
      // a record this version cannot read: forget it
    }
    this.forgetChat();
    return null;
  }

  /** Forgets the saved chat; given `id`, only if the saved chat is that one (not a newer chat's record). */
  forgetChat(id = undefined) {
    if (id !== undefined && this._savedId() !== id) return;
    this.store?.remove(`${this.storageKey}:chat`);
  }

  _savedId() {
    try {
      return JSON.parse(this.store?.get(`${this.storageKey}:chat`) ?? "null")?.id ?? null;
    } catch {
      return null;
    }
  }

  getChat(id, { signal } = {}) {
    return this._request("GET", `/v1/chats/${encodeURIComponent(id)}`, undefined, {}, signal);
  }

  cancelChat(id) {
    return this._request("POST", `/v1/chats/${encodeURIComponent(id)}/cancel`);
  }

  /** POST /v1/chats, sent again (up to 3 tries) when no answer came; `signal` stops the tries, not a POST under way. */
  async _create(body, headers, signal) {
    for (let tries = 1; ; tries++) {
      try {
        return await this._request("POST", "/v1/chats", body, headers);
      } catch (error) {
        // no answer (the network): the same key makes sending it again safe
        if (error instanceof StreambridgeError || signal?.aborted || tries >= 3) throw error;
        await sleep(backoff(tries), signal);
      }
    }
  }

  async _request(method, path, body = undefined, extraHeaders = {}, signal = undefined) {
    const headers = { Accept: "application/json", ...extraHeaders };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const init = { method, headers, signal, cache: "no-store" };
    if (body !== undefined) init.body = JSON.stringify(body);
    const response = await this._fetch(this.baseUrl + path, init);
    if (!response.ok) throw await errorFrom(response);
    return response.json();
  }
}

/**
 * One chat's events, followed to the end: callbacks, `for await`, and `done`.
 *
 * Resumes after drops (exactly once: events at or before the last id are skipped), after a 401 on
 * an expired stream token (a fresh stream_url from GET /v1/chats/{id}), and after a reload (the
 * record in the store). Stops at the terminal event, on `close()` or the AbortSignal, or on an
 * error it cannot get past.
 */
export class ChatStream {
  constructor(client, saved, options) {
    this.client = client;
    this.id = saved.id;
    this.streamUrl = saved.streamUrl ?? null;
    this.lastEventId = saved.lastEventId ?? null;
    this.meta = saved.meta ?? options.meta ?? null;
    this.status = saved.lastEventId ? "running" : "queued";
    this.attempt = saved.attempt ?? 0;
    this.terminal = null;
    this.reconnects = 0;
    this.queuePosition = null; // while queued and onQueued is given: 1 = the next chat to start
    this._cannotAsk = false; // the API answered 4xx about this chat: EventSource's silences are not checked
    this._ahead = undefined; // the last event when the API last said the chat was ahead of this stream
    this._parts = restoreParts(saved.parts);
    this._options = options;
    this._persist = options.persist ?? true;
    // Memory stays bounded by what the chat is: its text, its position, its end. Events are kept
    // whole only with `keepEvents` (an iterator started late then replays them from the first);
    // else each running iterator has a queue of what it has not read yet, and nothing more is held.
    this._keep = options.keepEvents ?? false;
    this._events = [];
    this._readers = new Set();
    this._wake = null;
    this._error = null;
    this._ended = false;
    this._saveTimer = null;
    this._stop = new AbortController();
    this._queued = new AbortController(); // aborted when the chat's first event arrives, or it ends
    this._unlisten = () => {};
    if (options.signal) {
      const signal = options.signal;
      const stop = () => this._stop.abort(signal.reason);
      if (signal.aborted) stop();
      else {
        signal.addEventListener("abort", stop, { once: true });
        // a signal that outlives the chat (one for the page, say) must not hold it in memory
        this._unlisten = () => signal.removeEventListener("abort", stop);
      }
    }
    this._stop.signal.addEventListener("abort", () => this._queued.abort(), { once: true });
    this._save(true); // this chat takes the store's record: an older chat's saves no longer touch it
    // The stream says nothing while the chat waits: only the API knows its place in the queue.
    if (typeof options.onQueued === "function" && this.lastEventId === null) {
      Promise.resolve().then(() => this._pollQueue(options.queuePollMs ?? QUEUE_POLL_MS));
    }
    // Started a turn later: the caller holds the object before any callback runs.
    this.done = Promise.resolve().then(() => this._run()).then(
      () => this._finish(),
      (error) => this._fail(error),
    );
    this.done.catch(() => {}); // callbacks alone are a complete way to use it: no unhandled rejection
  }

  /** The answer so far: the text of the attempt that completed, or of the latest one while it runs. */
  get text() {
    return this._parts.text;
  }

  get reasoning() {
    return this._parts.reasoning;
  }

  /** Tool calls so far, assembled from their fragments, in index order. */
  get toolCalls() {
    return [...this._parts.calls.entries()].sort(([a], [b]) => a - b).map(([, call]) => toolCall(call));
  }

  /** Asks the server to cancel the chat; the stream then ends with its `cancelled` event. */
  cancel() {
    return this.client.cancelChat(this.id);
  }

  /** Stops following (the chat goes on on the server; resumeChat or followChat picks it up again). */
  close(reason = new DOMException("the stream was closed", "AbortError")) {
    this._stop.abort(reason);
  }

  /**
   * Every event once, in order: from the first with `keepEvents`, else from the moment the
   * iterator is made (made before the first `await` after createChat, that is every event).
   */
  [Symbol.asyncIterator]() {
    const queue = [...this._events];
    let returned = false;
    if (!this._ended) this._readers.add(queue);
    return {
      next: async () => {
        for (;;) {
          if (returned) return { value: undefined, done: true };
          if (queue.length) return { value: queue.shift(), done: false };
          if (this._ended) {
            this._readers.delete(queue);
            if (this._error) throw this._error;
            return { value: undefined, done: true };
          }
          await new Promise((resolve) => {
            const previous = this._wake;
            this._wake = () => {
              previous?.();
              resolve();
            };
          });
        }
      },
      return: async () => {
        returned = true;
        queue.length = 0;
        this._readers.delete(queue);
        return { value: undefined, done: true };
      },
      [Symbol.asyncIterator]() {
        return this;
      },
    };
  }

  async _run() {
    const signal = this._stop.signal;
    this._failures = 0; // reset by an accepted event, not by an open: a 200 that closes at once must count
    this._failingSince = null; // when the failures in a row began (less the time offline); reset with them
    let stale = false;
    for (;;) {
      signal.throwIfAborted();
      let retryAfter = 0;
      let cause;
      try {
        if (stale) await this._refreshUrl(signal);
        signal.throwIfAborted(); // closed while the URL was refreshed: no new connection
        if (!this.reconnects) this._connection("connecting", {});
        await this._connect(signal, () => {
          stale = false; // the fresh URL works: a 401 later on (hours later, say) may ask for one again
          this._connection("open", { reconnects: this.reconnects });
        });
        if (this.terminal) return;
        cause = new Error("the stream ended before a terminal event");
      } catch (error) {
        if (signal.aborted) throw signal.reason;
        if (error?.code === "stream_silent") {
          this.reconnects += 1; // a quiet EventSource with no one to ask whether it died: opened again
          continue;
        }
        const status = error instanceof StreambridgeError ? error.status : null;
        if (status === 401 && !stale && this.client.token) {
          stale = true; // the stream token expired (or the bearer route needs one): ask the API again
          continue;
        }
        if (status === 410) throw await this._expired(error, signal);
        if (status !== null && status !== 429 && status < 500) throw error;
        cause = error;
        retryAfter = (error.retryAfter ?? 0) * 1000;
      }
      const failures = (this._failures += 1);
      if (failures === 1 || this._failingSince === null) this._failingSince = Date.now();
      const failingFor = Date.now() - this._failingSince;
      const retryFor = this._options.retryForMs ?? this.client.retryForMs;
      if (failures > this.client.maxReconnects || (failures > 1 && failingFor >= retryFor)) {
        const seconds = Math.round(failingFor / 1000);
        const message = `gave up after ${failures} failed connections in a row over ${seconds} s`;
        throw new StreambridgeError(null, "stream_lost", message, { cause });
      }
      this.reconnects += 1;
      const delay = Math.max(backoff(failures), retryAfter);
      this._connection("reconnecting", { attempt: failures, delay, error: cause });
      const offlineMs = await this._waitForNetwork(delay, signal);
      this._failingSince += offlineMs; // time offline is not a failure of the stream's
      signal.throwIfAborted();
    }
  }

  _connect(signal, opened) {
    const { url, headers } = this._route();
    const deliver = (id, type, data) => this._accept(id, type, data);
    const kind = this._options.transport ?? this.client.transport;
    const silence = this._options.readTimeoutMs ?? this.client.readTimeoutMs;
    // EventSource cannot send headers: it serves a stream_url (its token is in the URL) and no Bearer.
    // It never shows the edge's pings, so a dead connection is told from a quiet one only by asking
    // the API (GET /v1/chats/{id}): "auto" uses it only where the client can ask, else fetch, which
    // sees the pings (a stream_url needs no header: a backend's, handed to a browser with no token).
    const canAsk = Boolean(this.client.token) && !this._cannotAsk;
    const native = typeof EventSource === "function" && !headers.Authorization && canAsk;
    if (kind === "eventsource" || (kind === "auto" && native)) {
      // true: the chat has not moved on; null: the API will not say (not this token's chat)
      const alive = canAsk ? (stop) => this._movedOnWithoutUs(stop).then((moved) => (moved === null ? null : !moved)) : null;
      const watch = { silence, alive };
      return viaEventSource(url, this.lastEventId, signal, deliver, opened, (probe) => this.client._fetch(probe), watch);
    }
    return viaFetch(this.client._fetch, url, headers, this.lastEventId, signal, deliver, opened, silence);
  }

  /**
   * Whether the chat went on without this stream: its pings are out of EventSource's sight, so a
   * quiet connection (a long wait in the queue, a slow model) cannot be told from a dead one by
   * silence alone. The API can: a chat that ended, started, or has more text than arrived here
   * while the stream said nothing has lost its connection. A chat still waiting has not.
   */
  async _movedOnWithoutUs(signal) {
    if (this._cannotAsk) return null;
    let info;
    try {
      info = await this.client._request("GET", `/v1/chats/${encodeURIComponent(this.id)}`, undefined, {}, signal);
    } catch (error) {
      // the client's token is not the chat's owner's (a stream_url handed over by a backend): it
      // never will be, so stop asking; the stream is left to the browser, as without a token
      if (error instanceof StreambridgeError && [401, 403, 404].includes(error.status)) {
        this._cannotAsk = true;
        return null;
      }
      throw error;
    }
    if (TERMINAL.has(info.status)) return true; // ended, and its end never came
    // started, a later attempt, or more text than arrived here: the stream may be a moment behind
    // the API (an event on its way as the chat starts), so the same answer twice running says so
    const ahead =
      (info.attempts ?? 0) > this.attempt ||
      (info.status !== "queued" && this.status === "queued") ||
      [...(info.content ?? "")].length > [...this.text].length;
    const seen = ahead && this._ahead === this.lastEventId;
    this._ahead = ahead ? this.lastEventId : undefined;
    return seen;
  }

  _route() {
    if (this.streamUrl) return { url: new URL(this.streamUrl, baseOf(this.client)).href, headers: {} };
    const url = `${baseOf(this.client)}/v1/chats/${encodeURIComponent(this.id)}/events`;
    return { url, headers: this.client.token ? { Authorization: `Bearer ${this.client.token}` } : {} };
  }

  async _refreshUrl(signal) {
    const info = await this.client.getChat(this.id, { signal });
    this.streamUrl = info.stream_url ?? null;
  }

  /** 410: the history is gone. The final result (or the text so far) is fetched and kept on the error. */
  async _expired(error, signal) {
    let result = null;
    if (this.client.token) {
      try {
        result = await this.client.getChat(this.id, { signal });
      } catch {
        // the error below says what happened; the result is a courtesy
      }
    }
    signal.throwIfAborted(); // closed meanwhile: the caller's AbortError, not the expiry
    const message = "this chat's history has expired; its final result is on the error (GET /v1/chats/{id})";
    return new StreambridgeError(410, "stream_expired", message, { result, cause: error });
  }

  /**
   * Asks GET /v1/chats/{id} for the chat's place, after `interval` ms at first and then less often
   * (to QUEUE_POLL_MAX_MS, jittered; a 429 jumps there, and its Retry-After is waited), and hands it to onQueued, until
   * its first event arrives (it started, or ended), it is no longer queued, or the stream stops.
   * A failed ask is tried again next time (the stream, not this, decides whether the chat is lost),
   * except an answer that will not change: the chat is not ours (404), or no token (401).
   */
  async _pollQueue(interval) {
    const signal = this._queued.signal;
    const most = Math.max(QUEUE_POLL_MAX_MS, interval);
    for (let every = interval; !signal.aborted; every = Math.min(most, every * 1.5)) {
      let info = null;
      let wait = every * (0.75 + Math.random() / 2); // jittered: pages that came together spread out
      try {
        info = await this.client._request("GET", `/v1/chats/${encodeURIComponent(this.id)}`, undefined, {}, signal);
      } catch (error) {
        if (signal.aborted || (error instanceof StreambridgeError && [401, 403, 404].includes(error.status))) return;
        if (error instanceof StreambridgeError && error.retryAfter !== null) wait = Math.max(wait, error.retryAfter * 1000);
        if (error instanceof StreambridgeError && error.status === 429) every = most; // over a limit: slow down for good
      }
      if (signal.aborted) return; // an event arrived while the GET was out: the stream knows better
      if (info !== null) {
        if (info.status !== "queued") return;
        this.queuePosition = Number.isInteger(info.queue_position) ? info.queue_position : null;
        this._callback("onQueued", this.queuePosition, info);
      }
      try {
        await sleep(wait, signal);
      } catch {
        return;
      }
    }
  }

  /** One event from the wire: skipped if already seen, else applied, kept and handed to the callbacks. */
  _accept(id, type, data) {
    if (!ENTRY_ID.test(id ?? "")) throw new StreambridgeError(200, "bad_event_id", `an event came with the id ${id}`);
    if (this.lastEventId !== null && !after(id, this.lastEventId)) return false;
    if (!EVENT_TYPES.includes(type)) {
      this.lastEventId = id;
      return false; // a type newer than this client: skip it
    }
    const event = { ...JSON.parse(data), eventId: id }; // parsed before the position moves: a bad one is read again
    this.lastEventId = id;
    this._failures = 0;
    this._failingSince = null;
    this._queued.abort(); // the chat has left the queue: its events tell the rest
    this.queuePosition = null;
    const fresh = this._apply(event);
    if (this._keep) this._events.push(event);
    for (const queue of this._readers) queue.push(event);
    this._wake?.();
    this._wake = null;
    this._dispatch(event, fresh);
    this._scheduleSave(TERMINAL.has(type));
    return this.terminal !== null;
  }

  _apply(event) {
    let fresh = false;
    if ("attempt" in event && event.type !== "progress" && event.type !== "status" && event.type !== "error") {
      if (event.attempt !== this.attempt) {
        // A new attempt supersedes what the earlier one streamed (the contract's rule).
        fresh = this.attempt !== 0 || this._parts.text !== "";
        this.attempt = event.attempt;
        this._parts = restoreParts(null);
      }
    }
    if (event.type === "content") this._parts.text += event.content;
    else if (event.type === "reasoning") this._parts.reasoning += event.content;
    else if (event.type === "tool_call") {
      const call = this._parts.calls.get(event.index) ?? { id: "", name: "", arguments: "" };
      call.id ||= event.id ?? "";
      call.name ||= event.name ?? "";
      call.arguments += event.arguments ?? "";
      this._parts.calls.set(event.index, call);
    }
    if (event.type === "started") this.status = "running";
    if (TERMINAL.has(event.type)) {
      this.terminal = event;
      this.status = event.type;
    }
    return fresh;
  }

  _dispatch(event, fresh) {
    const call = (name, ...args) => this._callback(name, ...args);
    call("onEvent", event, this);
    if (fresh) call("onAttempt", event.attempt, this);
    if (event.type === "content") call("onContent", event.content, event, this.text);
    else if (event.type === "reasoning") call("onReasoning", event.content, event, this.reasoning);
    else if (event.type === "tool_call") call("onToolCall", event, this.toolCalls);
    else if (event.type === "progress") call("onProgress", event);
    else if (event.type === "status" || event.type === "started") call("onStatus", event);
    else if (event.type === "error") call("onAttemptError", event);
  }

  /**
   * The backoff; or, while the browser says it is offline, `{state: "offline"}` and a wait until it
   * is back or OFFLINE_RETRY_MS pass (one more try: `onLine` can be wrong). The ms spent offline.
   */
  async _waitForNetwork(ms, signal) {
    const offline = () => globalThis.navigator?.onLine === false;
    if (!offline()) await sleep(ms, signal); // offline already: the wait below is the backoff
    if (!offline()) return 0;
    const since = Date.now();
    this._connection("offline", { retryIn: OFFLINE_RETRY_MS });
    await untilOnline(OFFLINE_RETRY_MS, signal);
    return Date.now() - since;
  }

  _connection(state, detail) {
    this._callback("onConnection", { state, ...detail });
  }

  /**
   * Calls the caller's callback `name`. One that throws is a bug of the caller's, not of the
   * stream: it goes to `onCallbackError(error, name)` (the stream's, else the client's), else to
   * console.error, and the stream carries on as if the callback had returned.
   */
  _callback(name, ...args) {
    const callback = this._options[name];
    if (typeof callback !== "function") return;
    try {
      callback(...args);
    } catch (error) {
      const report = this._options.onCallbackError ?? this.client.onCallbackError;
      try {
        if (typeof report === "function") return void report(error, name);
      } catch (reportError) {
        globalThis.console?.error(`streambridge: onCallbackError threw`, reportError);
      }
      globalThis.console?.error(`streambridge: the ${name} callback threw`, error);
    }
  }

  _scheduleSave(now) {
    if (!this._persist || !this.client.store) return;
    if (now) return this._save();
    this._saveTimer ??= setTimeout(() => this._save(), PERSIST_EVERY_MS);
  }

  /** Writes this chat's record; `claim` (at the start) takes the record over, later writes only update our own. */
  _save(claim = false) {
    clearTimeout(this._saveTimer);
    this._saveTimer = null;
    if (!this._persist || !this.client.store) return;
    if (!claim && this.client._savedId() !== this.id) return; // a newer chat took the record (or it was forgotten)
    if (this.terminal) return this.client.forgetChat(this.id); // ended: nothing to resume
    const calls = [...this._parts.calls.entries()];
    const parts = { text: this._parts.text, reasoning: this._parts.reasoning, calls };
    const record = { id: this.id, streamUrl: this.streamUrl, lastEventId: this.lastEventId, attempt: this.attempt };
    try {
      this.client.store.set(`${this.client.storageKey}:chat`, JSON.stringify({ ...record, parts, meta: this.meta }));
    } catch {
      // storage full or refused: a reload then cannot resume, the stream itself goes on
    }
  }

  _result() {
    const t = this.terminal;
    return {
      id: this.id,
      status: t.type,
      text: this.text,
      reasoning: this.reasoning,
      toolCalls: this.toolCalls,
      terminal: t,
      reconnects: this.reconnects,
    };
  }

  _end(error) {
    clearTimeout(this._saveTimer); // a save still pending: what is saved at the end is decided now
    this._saveTimer = null;
    this._unlisten();
    this._queued.abort();
    this._readers.clear(); // each iterator keeps its own queue to read to its end
    this._ended = true;
    this._error = error;
    this._wake?.();
    this._wake = null;
  }

  _finish() {
    const result = this._result();
    // a failed chat: `for await` yields its `failed` event, then throws what `done` rejects with
    const error =
      result.status === "failed" ? new StreambridgeError(null, "chat_failed", this.terminal.message, { result }) : null;
    this._end(error);
    this._connection("closed", {});
    if (error) {
      this._callback("onError", error);
      throw error;
    }
    this._callback("onComplete", result);
    return result;
  }

  _fail(error) {
    this._end(error);
    this._connection("closed", { error });
    // an answer that a reload would get again (gone, not ours, not allowed): nothing to resume
    if (error?.code === "stream_expired" || [401, 403, 404].includes(error?.status)) {
      if (this._persist) this.client.forgetChat(this.id);
    } else this._save(); // closed, or the stream lost: a reload, or resumeChat, picks it up
    if (!this._stop.signal.aborted) this._callback("onError", error);
    throw error;
  }
}

/** Follows `url` with fetch: headers (Authorization, Last-Event-ID) and a readable body. */
async function viaFetch(fetchImpl, url, headers, lastEventId, signal, deliver, opened, silence) {
  signal.throwIfAborted(); // an "abort" listener added now would never fire
  const stop = new AbortController();
  const abort = () => stop.abort(signal.reason);
  signal.addEventListener("abort", abort, { once: true });
  let timer = null;
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(() => stop.abort(new StreambridgeError(null, "read_timeout", "the stream went silent")), silence);
  };
  try {
    const sent = { Accept: "text/event-stream", ...headers };
    if (lastEventId) sent["Last-Event-ID"] = lastEventId;
    arm();
    const response = await fetchImpl(url, { headers: sent, signal: stop.signal, cache: "no-store" });
    if (!response.ok) throw await errorFrom(response);
    opened();
    const parser = new SSEParser();
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    // a fetch whose body does not end with its signal (a polyfill, a test's) still ends with a read timeout
    const cut = () => reader.cancel(stop.signal.reason).catch(() => {});
    stop.signal.addEventListener("abort", cut, { once: true });
    try {
      for (;;) {
        const { value, done } = await reader.read();
        stop.signal.throwIfAborted();
        if (done) return;
        arm();
        for (const message of parser.feed(value)) {
          if (deliver(message.id, message.event, message.data)) return;
        }
      }
    } finally {
      stop.signal.removeEventListener("abort", cut);
      reader.cancel().catch(() => {});
    }
  } catch (error) {
    if (stop.signal.aborted && !signal.aborted && stop.signal.reason instanceof StreambridgeError) {
      throw stop.signal.reason;
    }
    throw error;
  } finally {
    clearTimeout(timer);
    signal.removeEventListener("abort", abort);
  }
}

/**
 * Follows `url` with the browser's EventSource, which sends no headers: the position rides in
 * `?last_event_id=`. Its own reconnection is not used (it would retry a 410 forever and knows no
 * backoff): any error closes it, and the caller reconnects. An error before the stream opened may
 * be an HTTP status EventSource does not show: one fetch asks, and is dropped once it has it.
 *
 * EventSource never shows the edge's `: ping` comments, so silence says nothing about the
 * connection: a chat waiting in the queue is silent for as long as it waits. After `watch.silence`
 * ms without an event, `watch.alive()` asks the API whether the chat went on without us; only then
 * is the connection taken for dead (`read_timeout`). Without `alive` (no token to ask with, or a
 * token that does not own the chat) a silence of `watch.silence` closes it and the caller opens it
 * again after the last event (`stream_silent`, not counted as a failure): a half-open connection
 * is never kept for good. "auto" does not come here then: it uses fetch, which sees the pings.
 */
function viaEventSource(url, lastEventId, signal, deliver, opened, fetchProbe, watch) {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(signal.reason); // an "abort" listener added now would never fire
    const target = new URL(url);
    if (lastEventId) target.searchParams.set("last_event_id", lastEventId);
    const source = new EventSource(target.href);
    let open = false;
    let timer = null;
    let asking = null; // the AbortController of a liveness question under way
    const arm = () => {
      clearTimeout(timer);
      asking?.abort(); // an event came: the question is answered
      asking = null;
      timer = setTimeout(check, watch.silence);
    };
    const check = () => {
      // no one to ask: after a silence, open again after the last event (exact, cheap, not a failure)
      if (!watch.alive) return finish(new StreambridgeError(null, "stream_silent", "the stream was silent: opened again"));
      const mine = (asking = new AbortController());
      watch.alive(mine.signal).then(
        (alive) => {
          if (mine.signal.aborted) return;
          if (alive === null) {
            watch.alive = null; // no one to ask from now on: silences open the stream again
            arm();
          } else if (alive) arm();
          else finish(new StreambridgeError(null, "read_timeout", "the stream went silent while the chat went on"));
        },
        () => mine.signal.aborted || arm(), // no answer: the connection may be fine; ask again later
      );
    };
    const finish = (error) => {
      clearTimeout(timer);
      asking?.abort();
      source.close();
      signal.removeEventListener("abort", onAbort);
      if (error) reject(error);
      else resolve();
    };
    const onAbort = () => finish(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    const onMessage = (message) => {
      // "error" is both an event type of the stream and EventSource's own signal of a failed
      // connection: only a MessageEvent is the stream's.
      if (!(message instanceof MessageEvent)) return;
      arm();
      try {
        if (deliver(message.lastEventId, message.type, message.data)) finish(null);
      } catch (error) {
        finish(error);
      }
    };
    for (const type of EVENT_TYPES) source.addEventListener(type, onMessage);
    source.addEventListener("open", () => {
      open = true;
      arm();
      opened();
    });
    source.addEventListener("error", (event) => {
      if (event instanceof MessageEvent) return; // the stream's own `error` event, handled above
      if (open) return finish(new StreambridgeError(null, "connection_lost", "the stream's connection dropped"));
      clearTimeout(timer);
      asking?.abort();
      source.close();
      probe(fetchProbe, target.href).then(finish, finish);
    });
    arm();
  });
}

async function probe(fetchImpl, url) {
  const stop = new AbortController();
  try {
    const response = await fetchImpl(new Request(url, { headers: { Accept: "text/event-stream" }, signal: stop.signal }));
    if (!response.ok) return await errorFrom(response);
    return new StreambridgeError(null, "connection_lost", "the stream could not be opened");
  } catch (error) {
    return error; // no answer at all: the network
  } finally {
    stop.abort();
  }
}

/** An incremental SSE parser as the WHATWG spec reads a stream (fed decoded text, split anywhere). */
export class SSEParser {
  constructor() {
    this._partial = "";
    this._skipLf = false;
    this._started = false;
    this._data = [];
    this._event = "";
    this._id = null;
  }

  feed(text) {
    if (!text) return [];
    if (!this._started) {
      this._started = true;
      if (text.startsWith("\ufeff")) text = text.slice(1);
    }
    if (this._skipLf && text.startsWith("\n")) text = text.slice(1);
    this._skipLf = text.endsWith("\r"); // a "\n" that may follow belongs to the same line end
    const lines = (this._partial + text).split(/\r\n|\r|\n/);
    this._partial = lines.pop();
    const messages = [];
    for (const line of lines) {
      const message = this._line(line);
      if (message) messages.push(message);
    }
    return messages;
  }

  _line(line) {
    if (line === "") {
      const data = this._data;
      const event = this._event;
      this._data = [];
      this._event = "";
      return data.length ? { id: this._id, event: event || "message", data: data.join("\n") } : null;
    }
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "data") this._data.push(value);
    else if (name === "event") this._event = value;
    else if (name === "id" && !value.includes("\0")) this._id = value;
    return null;
  }
}

function restoreParts(saved) {
  return {
    text: saved?.text ?? "",
    reasoning: saved?.reasoning ?? "",
    calls: new Map(saved?.calls ?? []),
  };
}

function toolCall(call) {
  return { id: call.id, type: "function", function: { name: call.name, arguments: call.arguments } };
}

/** `promise`, or its rejection with `signal.reason` as soon as `signal` aborts. */
function untilAborted(promise, signal) {
  if (!signal) return promise;
  return new Promise((resolve, reject) => {
    const stop = () => reject(signal.reason);
    if (signal.aborted) return stop();
    signal.addEventListener("abort", stop, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener("abort", stop));
  });
}

/** Whether stream entry id `a` comes after `b` ("ms-seq", each part a number). */
function after(a, b) {
  const [am, as] = a.split("-").map(BigInt);
  const [bm, bs] = b.split("-").map(BigInt);
  return am > bm || (am === bm && as > bs);
}

function baseOf(client) {
  return client.baseUrl || globalThis.location?.origin || "";
}

/** The wait before reconnect N (1, 2, …): doubling from 0.1 s to at most 15 s, each a random point in its upper half. */
export function backoff(failures, { startMs = BACKOFF_START_MS, maxMs = BACKOFF_MAX_MS } = {}) {
  const delay = Math.min(maxMs, startMs * 2 ** (failures - 1));
  return delay / 2 + (Math.random() * delay) / 2;
}

function randomKey() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(done, ms);
    function done() {
      signal?.removeEventListener("abort", stop);
      resolve();
    }
    function stop() {
      clearTimeout(timer);
      reject(signal.reason);
    }
    signal?.throwIfAborted();
    signal?.addEventListener("abort", stop, { once: true });
  });
}

/** Until the browser's `online` event, or `ms` at most; rejects when `signal` aborts. */
function untilOnline(ms, signal) {
  return new Promise((resolve, reject) => {
    signal.throwIfAborted();
    const listen = typeof globalThis.addEventListener === "function";
    const timer = setTimeout(() => back(), ms);
    const back = () => {
      clearTimeout(timer);
      if (listen) globalThis.removeEventListener("online", back);
      signal.removeEventListener("abort", stop);
      resolve();
    };
    const stop = () => {
      clearTimeout(timer);
      if (listen) globalThis.removeEventListener("online", back);
      reject(signal.reason);
    };
    if (listen) globalThis.addEventListener("online", back, { once: true });
    signal.addEventListener("abort", stop, { once: true });
  });
}

async function errorFrom(response) {
  const header = response.headers.get("Retry-After");
  const retryAfter = header !== null && /^\d+(\.\d+)?$/.test(header.trim()) ? Number(header) : null;
  let text = "";
  try {
    text = await response.text();
    const { error } = JSON.parse(text);
    if (error && typeof error.code === "string") {
      return new StreambridgeError(response.status, error.code, String(error.message ?? error.code), { retryAfter });
    }
  } catch {
    // not the JSON error body: a proxy's page, say
  }
  const message = text.trim().slice(0, 200) || response.statusText || "no message";
  return new StreambridgeError(response.status, `http_${response.status}`, message, { retryAfter });
}
