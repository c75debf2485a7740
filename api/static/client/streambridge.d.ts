// Types of streambridge.js: the browser client for streambridge's chat API and SSE edge.
// The event types mirror shared/events.py (the server's tagged union); each event also carries
// `eventId`, the stream entry id it came with (resume position).

export declare const VERSION: string;

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
  /** the upstream's breakdowns (cached_tokens, reasoning_tokens …), only where it sent them */
  prompt_tokens_details?: Record<string, number>;
  completion_tokens_details?: Record<string, number>;
}

interface Entry {
  /** the stream entry id this event came with, e.g. "1732400000000-0" */
  eventId: string;
}

export interface StartedEvent extends Entry { type: "started"; attempt: number; model: string }
/** text to append; superseded if a later attempt starts (see `onAttempt`) */
export interface ContentEvent extends Entry { type: "content"; content: string; index: number; attempt: number }
/** the model's reasoning, kept apart from the answer */
export interface ReasoningEvent extends Entry { type: "reasoning"; content: string; index: number; attempt: number }
/** one fragment of a streamed tool call; `id` and `name` come with its first fragment */
export interface ToolCallEvent extends Entry {
  type: "tool_call";
  index: number;
  id: string | null;
  name: string | null;
  arguments: string;
  attempt: number;
}
export interface ProgressEvent extends Entry { type: "progress"; chunks: number; chars: number; elapsed_ms: number; attempt: number }
/** a human-readable state change: retrying, worker lost and resumed … */
export interface StatusEvent extends Entry { type: "status"; message: string; attempt: number }
/** one attempt failed; `retryable` says whether another follows */
export interface AttemptErrorEvent extends Entry { type: "error"; message: string; retryable: boolean; attempt: number }
export interface CompleteEvent extends Entry {
  type: "complete";
  attempt: number;
  total_chunks: number;
  content_length: number;
  elapsed_ms: number;
  finish_reason: string | null;
  usage: Usage | null;
}
/** every attempt failed; when the upstream refused the request (a 4xx), its status, code and param */
export interface FailedEvent extends Entry {
  type: "failed";
  message: string;
  attempts: number;
  upstream_status?: number;
  code?: string;
  param?: string;
}
export interface CancelledEvent extends Entry { type: "cancelled" }

export type ChatEvent =
  | StartedEvent
  | ContentEvent
  | ReasoningEvent
  | ToolCallEvent
  | ProgressEvent
  | StatusEvent
  | AttemptErrorEvent
  | CompleteEvent
  | FailedEvent
  | CancelledEvent;
export type TerminalEvent = CompleteEvent | FailedEvent | CancelledEvent;

export interface ToolCall {
  id: string;
  type: "function";
  function: { name: string; arguments: string };
}

/** What `done` resolves to (and `onComplete` gets): the answer of the attempt that completed. */
export interface ChatResult {
  id: string;
  status: "complete" | "failed" | "cancelled";
  text: string;
  reasoning: string;
  toolCalls: ToolCall[];
  terminal: TerminalEvent;
  reconnects: number;
}

/** `GET /v1/chats/{id}` */
export interface ChatInfo {
  id: string;
  status: "queued" | "running" | "complete" | "failed" | "cancelled";
  content: string;
  finish_reason: string | null;
  usage: Usage | null;
  attempts: number;
  error: string | null;
  created_at?: string;
  stream_url?: string;
  reasoning?: string | null;
  tool_calls?: ToolCall[] | null;
  /** only while `status` is "queued": its place among every user's waiting chats, 1 = the next to start */
  queue_position?: number;
}

/** `POST /v1/chats` */
export interface ChatCreated {
  id: string;
  status: string;
  stream_url: string;
  created_at?: string;
}

export declare class StreambridgeError extends Error {
  constructor(
    status: number | null,
    code: string,
    message: string,
    options?: { retryAfter?: number | null; result?: ChatInfo | ChatResult | null; cause?: unknown },
  );
  name: "StreambridgeError";
  /** the HTTP status; null when there was no answer */
  status: number | null;
  /**
   * The server's error code (`not_found`, `unauthorized`, `rate_limited` …) or the client's own:
   * `stream_expired` (410: the history is gone; `result` holds the final state),
   * `chat_failed` (the chat ended `failed`; `result` is its ChatResult),
   * `stream_lost` (reconnecting gave up), `read_timeout`, `connection_lost`, `bad_event_id`.
   */
  code: string;
  retryAfter: number | null;
  result: ChatInfo | ChatResult | null;
}

/** Where the chat id, last event id and text so far are kept between reloads. */
export interface Store {
  get(key: string): string | null;
  set(key: string, value: string): void;
  remove(key: string): void;
}

export type ConnectionState =
  | { state: "connecting" }
  | { state: "open"; reconnects: number }
  | { state: "reconnecting"; attempt: number; delay: number; error: unknown }
  /** the browser says it is offline: the next try is when it is back, or in `retryIn` ms at most */
  | { state: "offline"; retryIn: number }
  | { state: "closed"; error?: unknown };

export interface ClientOptions {
  /** where the API is; "" (the default) is the page's own origin */
  baseUrl?: string;
  /** a Bearer token (an API key, or your backend's); without one the client logs in as a visitor */
  token?: string | null;
  /** sessionStorage by default; `memoryStore()` or null to keep nothing */
  store?: Store | null;
  /** prefix of the store's keys: `${storageKey}:token`, `${storageKey}:chat` */
  storageKey?: string;
  /**
   * "auto": EventSource for a stream_url when the client has a token to ask the API whether a quiet
   * stream died; fetch streaming otherwise (it sees the edge's pings), and when a header must be sent
   */
  transport?: "auto" | "eventsource" | "fetch";
  /**
   * how long failed connections in a row (no event between them) go on before the client gives up
   * with `stream_lost`, in ms (default 300000: five minutes); time the browser is offline is not counted
   */
  retryForMs?: number;
  /** failed connections in a row before giving up with `stream_lost` (default: no limit but retryForMs) */
  maxReconnects?: number;
  /**
   * ms of silence (default 45000; the edge pings every 15 s at most) after which a fetch stream is
   * taken for dead and resumed. EventSource never shows the pings: there, this silence only makes
   * the client ask `GET /v1/chats/{id}` whether the chat went on (ended, started, or has more text
   * than arrived) and resume if it did; a chat still waiting keeps its quiet stream.
   */
  readTimeoutMs?: number;
  /** where a callback that threw is reported (default: console.error); the stream carries on */
  onCallbackError?(error: unknown, callback: string): void;
  fetch?: typeof fetch;
}

export interface StreamOptions {
  signal?: AbortSignal;
  transport?: "auto" | "eventsource" | "fetch";
  /** keep the chat in the store so a reload resumes it (default true); one chat per storageKey */
  persist?: boolean;
  /** anything JSON to keep with the chat (the prompt, say); `savedChat().meta` gives it back */
  meta?: unknown;
  /**
   * keep every event for the chat's life, so an iterator started late replays them from the first
   * (default false: the chat keeps its text, position and end; an iterator gets the events from
   * when it is made, which before the first `await` after createChat is every one)
   */
  keepEvents?: boolean;
  /** overrides the client's `retryForMs` for this chat */
  retryForMs?: number;
  /** overrides the client's `readTimeoutMs` for this chat */
  readTimeoutMs?: number;
  /** overrides the client's `onCallbackError` for this chat */
  onCallbackError?(error: unknown, callback: string): void;
  onEvent?(event: ChatEvent, chat: ChatStream): void;
  /**
   * `text` is the whole answer so far: render it. When a later attempt supersedes the text, clear
   * what you drew in `onAttempt`: the new attempt may stream no text (a tool call only), and then
   * this is not called again. `onComplete`'s `result.text` is the final answer.
   */
  onContent?(piece: string, event: ContentEvent, text: string): void;
  onReasoning?(piece: string, event: ReasoningEvent, reasoning: string): void;
  onToolCall?(event: ToolCallEvent, calls: ToolCall[]): void;
  onProgress?(event: ProgressEvent): void;
  /** `started` and `status` events */
  onStatus?(event: StartedEvent | StatusEvent): void;
  /**
   * While the chat waits for a worker (before its first event), its place in the queue, asked of
   * GET /v1/chats/{id} every `queuePollMs` and then less often: 1 = the next chat to start; null if the API gave none.
   * Not called once the chat has started. Given this, the client polls; without it, it never does.
   */
  onQueued?(position: number | null, info: ChatInfo): void;
  /**
   * the first wait before onQueued's position is asked again, in ms (default 1000); each next wait
   * is 1.5 times longer (jittered), to 8000 at most. A 429 slows it to that at once, and its
   * Retry-After is honoured.
   */
  queuePollMs?: number;
  /** one attempt failed (another may follow: `retryable`) */
  onAttemptError?(event: AttemptErrorEvent): void;
  /** a new attempt started: what the last one streamed is superseded */
  onAttempt?(attempt: number, chat: ChatStream): void;
  onConnection?(state: ConnectionState): void;
  /** the chat ended `complete` or `cancelled`. Every callback is isolated: one that throws is reported, never breaks the stream */
  onComplete?(result: ChatResult): void;
  /** the chat failed, its history expired, or it could not be followed (not called for close()/abort) */
  onError?(error: StreambridgeError | Error): void;
}

/** A part of a message's content, as OpenAI's Chat Completions takes it. */
export type ContentPart =
  | { type: "text"; text: string }
  | { type: "image_url"; image_url: { url: string; detail?: "auto" | "low" | "high" } }
  | { type: "input_audio"; input_audio: { data: string; format: "wav" | "mp3" } }
  | { type: "file"; file: { file_data?: string; file_id?: string; filename?: string } }
  | { type: "refusal"; refusal: string };

/** A tool call an assistant made, in a message sent back with its results. */
export interface MessageToolCall {
  id: string;
  type: "function";
  function: { name: string; arguments: string };
}

/** A message of the conversation, as OpenAI's Chat Completions types them. */
export type ChatMessage =
  | { role: "system"; content: string | ContentPart[]; name?: string }
  | { role: "developer"; content: string | ContentPart[]; name?: string }
  | { role: "user"; content: string | ContentPart[]; name?: string }
  | {
      role: "assistant";
      /** null (or absent) when the assistant only called tools */
      content?: string | ContentPart[] | null;
      name?: string;
      tool_calls?: MessageToolCall[];
      refusal?: string | null;
    }
  | { role: "tool"; content: string | ContentPart[]; tool_call_id: string };

export interface ChatOptions extends StreamOptions {
  message?: string;
  messages?: ChatMessage[];
  model?: string;
  temperature?: number;
  max_tokens?: number;
  /** more fields of the request body (any OpenAI Chat Completions field) */
  body?: Record<string, unknown>;
  /**
   * the POST's Idempotency-Key (default: a random one per call). Give the same key to make two
   * calls one chat, as React's StrictMode runs an effect twice. `signal` also stops the login.
   */
  idempotencyKey?: string;
}

export interface SavedChat {
  id: string;
  streamUrl: string | null;
  lastEventId: string | null;
  attempt: number;
  /** what had arrived: the text, reasoning and tool calls (by index) of the attempt under way */
  parts?: { text: string; reasoning: string; calls: [number, { id: string; name: string; arguments: string }][] };
  meta: unknown;
}

export declare class ChatStream implements AsyncIterable<ChatEvent> {
  /** made by `createChat`, `followChat` and `resumeChat`, not by hand */
  constructor(
    client: StreambridgeClient,
    saved: { id: string; streamUrl?: string | null } | SavedChat,
    options: StreamOptions,
  );
  readonly id: string;
  readonly streamUrl: string | null;
  /** the id of the last event received: where a resume starts */
  readonly lastEventId: string | null;
  readonly meta: unknown;
  readonly status: "queued" | "running" | "complete" | "failed" | "cancelled";
  readonly attempt: number;
  readonly terminal: TerminalEvent | null;
  readonly reconnects: number;
  /** the last place in the queue onQueued was given; null once the chat started, or unknown */
  readonly queuePosition: number | null;
  readonly text: string;
  readonly reasoning: string;
  readonly toolCalls: ToolCall[];
  /** resolves at `complete` or `cancelled`; rejects with a StreambridgeError otherwise (or the abort reason) */
  readonly done: Promise<ChatResult>;
  /** asks the server to cancel; the stream ends with its `cancelled` event */
  cancel(): Promise<{ id: string; status: string }>;
  /** stops following; the chat goes on, and stays in the store to be resumed */
  close(reason?: unknown): void;
  /**
   * every event once, in order, from when the iterator is made (from the first with `keepEvents`);
   * ends after the terminal one, throws what `done` rejects with
   */
  [Symbol.asyncIterator](): AsyncIterator<ChatEvent>;
}

export declare class StreambridgeClient {
  constructor(options?: ClientOptions);
  baseUrl: string;
  token: string | null;
  /** a new visitor; calls made while one is under way share it; `signal` stops the wait */
  login(options?: { signal?: AbortSignal }): Promise<string>;
  createChat(options: ChatOptions): Promise<ChatStream>;
  followChat(chat: ChatCreated | string, options?: StreamOptions): ChatStream;
  /** the chat this tab was following before a reload, resumed after its last event; null if none */
  resumeChat(options?: StreamOptions): ChatStream | null;
  savedChat(): SavedChat | null;
  /** forgets the saved chat; given `id`, only if the saved chat is that one */
  forgetChat(id?: string): void;
  getChat(id: string, options?: { signal?: AbortSignal }): Promise<ChatInfo>;
  cancelChat(id: string): Promise<{ id: string; status: string }>;
}

export declare function createClient(options?: ClientOptions): StreambridgeClient;
export declare function createChat(options: ClientOptions & ChatOptions & { client?: StreambridgeClient }): Promise<ChatStream>;
export declare function sessionStore(): Store;
export declare function memoryStore(): Store;
/** the wait before reconnect `failures` (1, 2, …): doubling from startMs (100) to maxMs (15000), a random point in its upper half */
export declare function backoff(failures: number, options?: { startMs?: number; maxMs?: number }): number;

export interface SSEMessage { id: string | null; event: string; data: string }
export declare class SSEParser {
  feed(text: string): SSEMessage[];
}
