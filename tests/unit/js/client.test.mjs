// streambridge.js without a browser (node --test): the resume rules against a scripted fetch.
import assert from "node:assert/strict";
import { mock, test } from "node:test";
import { backoff, createClient, memoryStore, SSEParser } from "../../../api/static/client/streambridge.js";

const ID = "0123456789abcdef0123456789abcdef";
const sse = (id, type, data) => `id: ${id}\nevent: ${type}\ndata: ${JSON.stringify({ type, ...data })}\n\n`;
const content = (id, text) => sse(id, "content", { content: text, index: 1, attempt: 1 });
const json = (status, body) => new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } });

/** A fetch that answers the API's routes and hands each events request to the next of `streams`. */
function scripted(streams, seen) {
  return async (url, init = {}) => {
    const path = new URL(url).pathname;
    if (path === "/v1/auth/visitor") return json(201, { token: "tok", user: "u" });
    if (path === "/v1/chats") return json(202, { id: ID, status: "queued", stream_url: `/v1/chats/${ID}/events?token=s` });
    if (path === `/v1/chats/${ID}`) return json(200, { id: ID, status: "complete", content: "the final text" });
    seen.push(init.headers?.["Last-Event-ID"] ?? null);
    const next = streams.shift();
    if (typeof next === "number") return json(next, { error: { code: next === 410 ? "stream_expired" : "x", message: "m" } });
    return new Response(next, { status: 200, headers: { "Content-Type": "text/event-stream" } });
  };
}

test("a dropped stream resumes after the last id, and nothing is repeated", async () => {
  const seen = [];
  const first = sse("1-0", "started", { attempt: 1, model: "m" }) + content("2-0", "Hel") + content("3-0", "lo");
  const second = content("3-0", "lo") + content("4-0", ", wörld 👩‍💻") + sse("5-0", "complete", { attempt: 1 });
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: scripted([first, second], seen) });
  const pieces = [];
  const chat = await client.createChat({ message: "hi", transport: "fetch", onContent: (piece) => pieces.push(piece) });
  const types = [];
  for await (const event of chat) types.push(`${event.eventId} ${event.type}`);
  const result = await chat.done;
  assert.equal(result.text, "Hello, wörld 👩‍💻");
  assert.deepEqual(pieces, ["Hel", "lo", ", wörld 👩‍💻"]);
  assert.deepEqual(types, ["1-0 started", "2-0 content", "3-0 content", "4-0 content", "5-0 complete"]);
  assert.deepEqual(seen, [null, "3-0"]);
  assert.equal(chat.reconnects, 1);
  assert.equal(client.savedChat(), null); // ended: nothing to resume
});

test("a reload resumes from the stored position with the text so far", async () => {
  const store = memoryStore();
  const seen = [];
  const first = content("2-0", "Hel") + content("3-0", "lo");
  const client = createClient({ baseUrl: "http://x", store, fetch: scripted([first], seen), maxReconnects: 0 });
  const chat = await client.createChat({ message: "hi", transport: "fetch", meta: { prompt: "hi" } });
  await assert.rejects(chat.done, { code: "stream_lost" });
  assert.deepEqual(client.savedChat().meta, { prompt: "hi" });
  const rest = content("4-0", "!") + sse("5-0", "complete", { attempt: 1 });
  const again = createClient({ baseUrl: "http://x", store, fetch: scripted([rest], seen) });
  const resumed = again.resumeChat({ transport: "fetch" });
  assert.equal(resumed.text, "Hello");
  assert.equal((await resumed.done).text, "Hello!");
  assert.deepEqual(seen, [null, "3-0"]); // the first client gave up at once (maxReconnects: 0)
});

test("410 is stream_expired holding the final result", async () => {
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: scripted([410], []) });
  const errors = [];
  const chat = await client.createChat({ message: "hi", transport: "fetch", onError: (e) => errors.push(e.code) });
  const error = await chat.done.then(() => null, (e) => e);
  assert.equal(error.code, "stream_expired");
  assert.equal(error.status, 410);
  assert.equal(error.result.content, "the final text");
  assert.deepEqual(errors, ["stream_expired"]);
});

test("a later attempt supersedes the text of the earlier one", async () => {
  const stream =
    content("1-0", "half an ans") +
    sse("2-0", "error", { message: "dropped", retryable: true, attempt: 1 }) +
    sse("3-0", "content", { content: "whole", index: 1, attempt: 2 }) +
    sse("4-0", "complete", { attempt: 2 });
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: scripted([stream], []) });
  const attempts = [];
  const chat = await client.createChat({ message: "hi", transport: "fetch", onAttempt: (n) => attempts.push(n) });
  assert.equal((await chat.done).text, "whole");
  assert.deepEqual(attempts, [2]);
});

test("the SSE parser takes text split anywhere, CRLF included", () => {
  const wire = "id: 1-0\r\nevent: content\r\ndata: {\"a\":1}\r\n\r\n: ping\n\nid: 2-0\rdata: x\rdata: y\r\r";
  for (let cut = 0; cut <= wire.length; cut++) {
    const parser = new SSEParser();
    const messages = [...parser.feed(wire.slice(0, cut)), ...parser.feed(wire.slice(cut))];
    assert.deepEqual(messages, [
      { id: "1-0", event: "content", data: '{"a":1}' },
      { id: "2-0", event: "message", data: "x\ny" },
    ]);
  }
});

test("a queued chat's place is polled and reported until its first event, then never again", async () => {
  const encoder = new TextEncoder();
  let push;
  const body = new ReadableStream({ start: (controller) => void (push = (text) => controller.enqueue(encoder.encode(text))) });
  const places = [3, 2, 1];
  let polls = 0;
  const fetchImpl = async (url, init = {}) => {
    const path = new URL(url).pathname;
    if (path === "/v1/auth/visitor") return json(201, { token: "tok", user: "u" });
    if (path === "/v1/chats") return json(202, { id: ID, status: "queued", stream_url: `/v1/chats/${ID}/events?token=s` });
    if (path === `/v1/chats/${ID}`) {
      polls += 1;
      assert.equal(init.headers.Authorization, "Bearer tok");
      return json(200, { id: ID, status: "queued", content: "", queue_position: places.shift() ?? 1 });
    }
    return new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } });
  };
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: fetchImpl });
  const seen = [];
  let chat;
  await new Promise((resolve, reject) => {
    client
      .createChat({
        message: "hi",
        transport: "fetch",
        queuePollMs: 5,
        onQueued: (position, info) => {
          seen.push(position);
          assert.equal(info.status, "queued");
          assert.equal(chat?.queuePosition ?? position, position);
          if (position === 1) resolve();
        },
      })
      .then((c) => void (chat = c), reject);
  });
  push(sse("1-0", "started", { attempt: 1, model: "m" }) + content("2-0", "hi") + sse("3-0", "complete", { attempt: 1 }));
  assert.equal((await chat.done).text, "hi");
  assert.deepEqual(seen, [3, 2, 1]);
  assert.equal(chat.queuePosition, null);
  const after = polls;
  await new Promise((resolve) => setTimeout(resolve, 30));
  assert.equal(polls, after); // ended: no more asking
});

test("polling stops when the chat is no longer queued, and never happens without onQueued", async () => {
  let polls = 0;
  const counting = (streams) => {
    const inner = scripted(streams, []);
    return (url, init) => {
      if (new URL(url).pathname === `/v1/chats/${ID}`) polls += 1;
      return inner(url, init);
    };
  };
  const stream = sse("1-0", "started", { attempt: 1, model: "m" }) + sse("2-0", "complete", { attempt: 1 });
  const plain = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: counting([stream]) });
  await (await plain.createChat({ message: "hi", transport: "fetch" })).done;
  assert.equal(polls, 0);
  // the stream stays open and silent; the API says "complete" (scripted()): the first answer ends the polling
  polls = 0;
  const seen = [];
  const inner = counting([]);
  const silentStream = (url, init) => {
    if (!new URL(url).pathname.endsWith("/events")) return inner(url, init);
    const body = new ReadableStream({
      start: (controller) => init.signal.addEventListener("abort", () => controller.error(init.signal.reason)),
    });
    return new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } });
  };
  const polled = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: silentStream });
  const chat = await polled.createChat({ message: "hi", transport: "fetch", queuePollMs: 1, onQueued: (p) => seen.push(p) });
  while (polls === 0) await new Promise((resolve) => setTimeout(resolve, 1));
  await new Promise((resolve) => setTimeout(resolve, 20));
  assert.equal(polls, 1);
  assert.deepEqual(seen, []);
  chat.close();
  await chat.done.catch(() => {});
});

test("streams that open and close without an event count toward maxReconnects", { timeout: 5000 }, async () => {
  const seen = [];
  const empties = Array.from({ length: 10 }, () => ""); // a 200 that ends at once, again and again
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: scripted(empties, seen), maxReconnects: 2 });
  const chat = await client.createChat({ message: "hi", transport: "fetch" });
  await assert.rejects(chat.done, { code: "stream_lost" });
  assert.equal(seen.length, 3, "one try and two reconnects, not one per open");
});

test("a malformed event is read again, not skipped", async () => {
  const seen = [];
  const broken = content("2-0", "Hel") + "id: 3-0\nevent: content\ndata: {not json\n\n";
  const rest = content("3-0", "lo") + sse("4-0", "complete", { attempt: 1 });
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: scripted([broken, rest], seen) });
  const chat = await client.createChat({ message: "hi", transport: "fetch" });
  assert.equal((await chat.done).text, "Hello");
  assert.deepEqual(seen, [null, "2-0"]);
});

/** A stand-in for the browser's EventSource (node has none): the test opens it and sends events. */
class FakeEventSource extends EventTarget {
  static made = [];
  constructor(url) {
    super();
    this.url = new URL(url);
    this.closed = false;
    FakeEventSource.made.push(this);
  }
  close() {
    this.closed = true;
  }
  open() {
    this.dispatchEvent(new Event("open"));
  }
  send(id, type, data) {
    this.dispatchEvent(new MessageEvent(type, { data: JSON.stringify({ type, ...data }), lastEventId: id }));
  }
}

const turns = async (n = 5) => {
  for (let i = 0; i < n; i++) await new Promise((resolve) => setImmediate(resolve));
};

/** The API's routes, with GET /v1/chats/{id} answered by `info()`; events go over FakeEventSource. */
function apiOnly(info, asked = []) {
  return async (url) => {
    const path = new URL(url).pathname;
    if (path === "/v1/auth/visitor") return json(201, { token: "tok", user: "u" });
    if (path === "/v1/chats") return json(202, { id: ID, status: "queued", stream_url: `/v1/chats/${ID}/events?token=s` });
    if (path === `/v1/chats/${ID}`) {
      asked.push(path);
      return json(200, { id: ID, content: "", ...info() });
    }
    throw new Error(`unexpected ${url}`);
  };
}

test("a quiet EventSource stream (a long wait in the queue) is not taken for dead", async (t) => {
  // EventSource never shows the edge's `: ping` comments: silence alone must not end the stream.
  t.after(() => {
    mock.timers.reset();
    delete globalThis.EventSource;
  });
  globalThis.EventSource = FakeEventSource;
  FakeEventSource.made = [];
  mock.timers.enable({ apis: ["setTimeout"] });
  const asked = [];
  let status = "queued";
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: apiOnly(() => ({ status }), asked) });
  const states = [];
  const chat = await client.createChat({ message: "hi", transport: "eventsource", onConnection: (c) => states.push(c.state) });
  await turns();
  const [source] = FakeEventSource.made;
  source.open();
  for (let minute = 0; minute < 5; minute++) {
    mock.timers.tick(60_000); // five silent minutes in the queue, each past the 45 s read timeout
    await turns();
  }
  assert.ok(asked.length >= 5, "each silence past the timeout asks the API whether the chat went on");
  assert.equal(source.closed, false);
  assert.equal(FakeEventSource.made.length, 1);
  status = "running";
  source.send("1-0", "started", { attempt: 1, model: "m" });
  source.send("2-0", "content", { content: "hi", index: 1, attempt: 1 });
  source.send("3-0", "complete", { attempt: 1 });
  assert.equal((await chat.done).text, "hi");
  assert.equal(chat.reconnects, 0);
  assert.deepEqual(states, ["connecting", "open", "closed"]);
});

test("a silent EventSource stream whose chat went on without it reconnects after the last id", async (t) => {
  t.after(() => {
    mock.timers.reset();
    delete globalThis.EventSource;
  });
  globalThis.EventSource = FakeEventSource;
  FakeEventSource.made = [];
  mock.timers.enable({ apis: ["setTimeout"] });
  // the server has more text than arrived: the connection died without a word (a half-open socket)
  const client = createClient({
    baseUrl: "http://x",
    store: memoryStore(),
    readTimeoutMs: 1000,
    fetch: apiOnly(() => ({ status: "running", content: "Hello, more" })),
  });
  const chat = await client.createChat({ message: "hi", transport: "eventsource" });
  await turns();
  const [first] = FakeEventSource.made;
  first.open();
  first.send("1-0", "started", { attempt: 1, model: "m" });
  first.send("2-0", "content", { content: "Hello", index: 1, attempt: 1 });
  mock.timers.tick(1000);
  await turns();
  assert.equal(first.closed, false, "one answer ahead of the stream may be an event on its way");
  mock.timers.tick(1000);
  await turns();
  assert.equal(first.closed, true, "the same answer after another silence: the connection is dead");
  mock.timers.tick(2000); // the backoff
  await turns();
  const second = FakeEventSource.made[1];
  assert.equal(second.url.searchParams.get("last_event_id"), "2-0");
  second.open();
  second.send("2-0", "content", { content: "Hello", index: 1, attempt: 1 }); // at or before the position: skipped
  second.send("3-0", "content", { content: ", more", index: 2, attempt: 1 });
  second.send("4-0", "complete", { attempt: 1 });
  assert.equal((await chat.done).text, "Hello, more");
  assert.equal(chat.reconnects, 1);
});

test("an EventSource stream a moment behind the API is not taken for dead", async (t) => {
  t.after(() => {
    mock.timers.reset();
    delete globalThis.EventSource;
  });
  globalThis.EventSource = FakeEventSource;
  FakeEventSource.made = [];
  mock.timers.enable({ apis: ["setTimeout"] });
  // the chat starts as the silence ends: the API says so before its `started` event arrives here
  const client = createClient({
    baseUrl: "http://x",
    store: memoryStore(),
    readTimeoutMs: 1000,
    fetch: apiOnly(() => ({ status: "running", attempts: 1, content: "" })),
  });
  const chat = await client.createChat({ message: "hi", transport: "eventsource" });
  await turns();
  const [source] = FakeEventSource.made;
  source.open();
  mock.timers.tick(1000);
  await turns();
  source.send("1-0", "started", { attempt: 1, model: "m" }); // the event that was on its way
  source.send("2-0", "content", { content: "Hi", index: 1, attempt: 1 });
  source.send("3-0", "complete", { attempt: 1 });
  assert.equal((await chat.done).text, "Hi");
  assert.equal(chat.reconnects, 0);
  assert.equal(FakeEventSource.made.length, 1);
});

test("a callback that throws is reported and the stream carries on", async (t) => {
  const stream = sse("1-0", "started", { attempt: 1, model: "m" }) + content("2-0", "Hel") + content("3-0", "lo");
  const rest = sse("4-0", "complete", { attempt: 1 });
  const boom = (name) => () => {
    throw new Error(name);
  };
  const names = [
    "onEvent", "onContent", "onStatus", "onConnection", "onComplete", "onError", "onAttempt", "onProgress", "onQueued",
  ];
  const callbacks = Object.fromEntries(names.map((name) => [name, boom(name)]));
  const reported = [];
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: scripted([stream, rest], []) });
  const chat = await client.createChat({
    message: "hi",
    transport: "fetch",
    ...callbacks,
    onCallbackError: (error, name) => reported.push(`${name}: ${error.message}`),
  });
  const result = await chat.done;
  assert.equal(result.text, "Hello");
  assert.equal(chat.reconnects, 1); // the one drop the script has, not one per throw
  for (const name of ["onEvent", "onContent", "onStatus", "onConnection", "onComplete"]) {
    assert.ok(reported.includes(`${name}: ${name}`), `${name} was reported: ${reported}`);
  }
  // without onCallbackError: console.error, and a failed chat still ends with its error
  const logged = t.mock.method(console, "error", () => {});
  const failing = sse("1-0", "failed", { message: "no", attempts: 1 });
  const other = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: scripted([failing], []) });
  const failed = await other.createChat({ message: "hi", transport: "fetch", ...callbacks });
  await assert.rejects(failed.done, { code: "chat_failed" });
  const said = logged.mock.calls.map((c) => c.arguments[0]);
  assert.ok(said.includes("streambridge: the onError callback threw"), said.join("; "));
  assert.ok(said.includes("streambridge: the onConnection callback threw"));
});

test("events are not all kept: an iterator gets them from when it starts, all of them with keepEvents", async () => {
  const stream = sse("1-0", "started", { attempt: 1, model: "m" }) + content("2-0", "Hi") + sse("3-0", "complete", { attempt: 1 });
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: scripted([stream, stream], []) });
  const chat = await client.createChat({ message: "hi", transport: "fetch" });
  const early = [];
  const reading = (async () => {
    for await (const event of chat) early.push(event.type);
  })();
  await chat.done;
  await reading;
  assert.deepEqual(early, ["started", "content", "complete"]); // made before the first await: every event
  assert.equal(chat._events.length, 0);
  assert.equal(chat._readers.size, 0);
  const late = [];
  for await (const event of chat) late.push(event.type);
  assert.deepEqual(late, []); // nothing was held for it
  const kept = await client.createChat({ message: "hi", transport: "fetch", keepEvents: true });
  await kept.done;
  const all = [];
  for await (const event of kept) all.push(event.type);
  assert.deepEqual(all, ["started", "content", "complete"]);
  assert.equal((await kept.done).text, "Hi");
});

test("createChat's AbortSignal reaches login: no chat is made once it aborts", async () => {
  let release;
  const posted = [];
  const slowLogin = async (url, init = {}) => {
    const path = new URL(url).pathname;
    if (path === "/v1/auth/visitor") {
      await new Promise((resolve) => void (release = resolve));
      return json(201, { token: "tok", user: "u" });
    }
    posted.push(path);
    return json(202, { id: ID, status: "queued", stream_url: `/v1/chats/${ID}/events?token=s` });
  };
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: slowLogin });
  const controller = new AbortController();
  const creating = client.createChat({ message: "hi", transport: "fetch", signal: controller.signal });
  await turns();
  controller.abort();
  await assert.rejects(creating, { name: "AbortError" }); // at once, not when the login answers
  release();
  await turns();
  assert.deepEqual(posted, []);
  const already = new AbortController();
  already.abort();
  await assert.rejects(client.createChat({ message: "hi", signal: already.signal }), { name: "AbortError" });
  assert.deepEqual(posted, []);
});

test("logins at the same time make one visitor, so two chats started together share their owner", async () => {
  let visitors = 0;
  const fetchImpl = async (url) => {
    const path = new URL(url).pathname;
    if (path === "/v1/auth/visitor") {
      visitors += 1;
      await turns(1);
      return json(201, { token: `tok${visitors}`, user: "u" });
    }
    return json(202, { id: ID, status: "queued", stream_url: `/v1/chats/${ID}/events?token=s` });
  };
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: fetchImpl });
  const [a, b] = await Promise.all([client.login(), client.login()]);
  assert.equal(visitors, 1);
  assert.equal(a, b);
});

test("the Idempotency-Key can be the caller's, so two calls (a StrictMode double effect) make one chat", async () => {
  const keys = [];
  const fetchImpl = async (url, init = {}) => {
    const path = new URL(url).pathname;
    if (path === "/v1/auth/visitor") return json(201, { token: "tok", user: "u" });
    if (path === "/v1/chats") keys.push(init.headers["Idempotency-Key"]);
    return json(202, { id: ID, status: "queued", stream_url: `/v1/chats/${ID}/events?token=s` });
  };
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: fetchImpl });
  const chat = await client.createChat({ message: "hi", idempotencyKey: "k1", transport: "fetch" });
  chat.close();
  await chat.done.catch(() => {});
  assert.deepEqual(keys, ["k1"]);
});

test("an older chat that ends does not erase a newer chat's saved record", async () => {
  const store = memoryStore();
  let push;
  const held = new ReadableStream({ start: (c) => void (push = (text) => c.enqueue(new TextEncoder().encode(text))) });
  let streams = 0;
  const fetchImpl = async (url, init = {}) => {
    const path = new URL(url).pathname;
    if (path === "/v1/auth/visitor") return json(201, { token: "tok", user: "u" });
    if (path === "/v1/chats") {
      const id = `${ID.slice(0, -1)}${++streams}`;
      return json(202, { id, status: "queued", stream_url: `/v1/chats/${id}/events?token=s` });
    }
    if (path.endsWith("1/events")) return new Response(held, { status: 200 });
    // the newer one: silent until closed (as fetch does, the body errors when its signal aborts)
    const silent = new ReadableStream({ start: (c) => init.signal.addEventListener("abort", () => c.error(init.signal.reason)) });
    return new Response(silent, { status: 200 });
  };
  const client = createClient({ baseUrl: "http://x", store, fetch: fetchImpl });
  const older = await client.createChat({ message: "one", transport: "fetch" });
  await turns();
  const newer = await client.createChat({ message: "two", transport: "fetch", meta: "two" });
  assert.equal(client.savedChat().id, newer.id);
  push(content("1-0", "late text") + sse("2-0", "complete", { attempt: 1 }));
  await older.done;
  assert.equal(client.savedChat()?.id, newer.id, "the newer chat is still there to resume");
  assert.equal(client.savedChat().meta, "two");
  newer.close();
  await newer.done.catch(() => {});
  assert.equal(client.savedChat().id, newer.id);
});

test("reconnect delays are jittered, doubling to a cap", () => {
  const delays = Array.from({ length: 50 }, () => backoff(3));
  assert.ok(delays.every((d) => d >= 200 && d <= 400), String(delays));
  assert.ok(new Set(delays).size > 40, "jittered, not one fixed delay");
  assert.ok(backoff(30) <= 15000);
  assert.ok(backoff(30) >= 7500, "the cap grows past a few seconds: many pages cut at once come back spread out");
  assert.ok(backoff(30, { startMs: 250, maxMs: 5000 }) >= 2500);
});

test("a stream token that expires again after a refresh is refreshed again, not fatal", async () => {
  const seen = [];
  const partial = content("1-0", "Hel");
  const rest = content("2-0", "lo") + sse("3-0", "complete", { attempt: 1 });
  // 401, then a fresh URL that works for a while and drops, then 401 again (hours later, say)
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), fetch: scripted([401, partial, 401, rest], seen) });
  const chat = await client.createChat({ message: "hi", transport: "fetch" });
  assert.equal((await chat.done).text, "Hello");
  assert.deepEqual(seen, [null, null, "1-0", "1-0"]);
});

test("the AbortSignal's listener goes when the chat ends: a long-lived signal does not hold every chat", async (t) => {
  const controller = new AbortController(); // one for the page's whole life
  const added = t.mock.method(controller.signal, "addEventListener");
  const removed = t.mock.method(controller.signal, "removeEventListener");
  const stream = sse("1-0", "started", { attempt: 1, model: "m" }) + sse("2-0", "complete", { attempt: 1 });
  // a token given: no login, whose own listener would be added and removed and hide a leak
  const client = createClient({ baseUrl: "http://x", token: "tok", store: memoryStore(), fetch: scripted([stream], []) });
  const chat = await client.createChat({ message: "hi", transport: "fetch", signal: controller.signal });
  await chat.done;
  const fns = (mocked) => mocked.mock.calls.filter((c) => c.arguments[0] === "abort").map((c) => c.arguments[1]);
  assert.ok(fns(added).length >= 1, "the chat listens to the signal");
  for (const listener of fns(added)) assert.ok(fns(removed).includes(listener), "each listener added is removed");
});

test("over EventSource, a client whose token does not own the chat stops asking after the first 404", async (t) => {
  t.after(() => {
    mock.timers.reset();
    delete globalThis.EventSource;
  });
  globalThis.EventSource = FakeEventSource;
  FakeEventSource.made = [];
  mock.timers.enable({ apis: ["setTimeout"] });
  let asked = 0;
  const fetchImpl = async (url) => {
    asked += 1;
    return json(404, { error: { code: "not_found", message: new URL(url).pathname } });
  };
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), token: "someone-else", fetch: fetchImpl });
  const chat = client.followChat({ id: ID, stream_url: `/v1/chats/${ID}/events?token=s` }, { transport: "eventsource" });
  await turns();
  FakeEventSource.made[0].open();
  for (let n = 0; n < 4; n++) {
    mock.timers.tick(45_000);
    await turns();
  }
  assert.equal(asked, 1);
  // with no one to ask, a silence is answered by opening it again: a half-open one is not kept
  assert.ok(FakeEventSource.made.length >= 2);
  chat.close();
  await chat.done.catch(() => {});
});

test("close() while the stream token is refreshed: no new connection, no callbacks, done rejects", async () => {
  let releaseGet;
  let getSignal;
  let streams = 0;
  const fetchImpl = async (url, init = {}) => {
    const where = new URL(url);
    if (where.pathname === "/v1/chats") return json(202, { id: ID, status: "queued", stream_url: `/v1/chats/${ID}/events?token=old` });
    if (where.pathname === `/v1/chats/${ID}`) {
      getSignal = init.signal;
      await new Promise((resolve) => (releaseGet = resolve)); // a slow answer, that ignores the abort
      return json(200, { id: ID, status: "running", content: "", stream_url: `/v1/chats/${ID}/events?token=new` });
    }
    streams += 1;
    if (where.searchParams.get("token") === "old") return json(401, { error: { code: "unauthorized", message: "expired" } });
    return new Response(sse("1-0", "started", { attempt: 1, model: "m" }) + content("2-0", "after close!") + sse("3-0", "complete", { attempt: 1 }));
  };
  const client = createClient({ baseUrl: "http://x", token: "tok", store: memoryStore(), fetch: fetchImpl });
  const calls = [];
  const chat = await client.createChat({
    message: "hi",
    transport: "fetch",
    onContent: (piece) => calls.push(`content ${piece}`),
    onComplete: () => calls.push("complete"),
    onError: () => calls.push("error"),
  });
  while (!releaseGet) await new Promise((resolve) => setTimeout(resolve, 1));
  chat.close();
  assert.equal(getSignal?.aborted, true, "the refresh's GET is aborted with the stream");
  releaseGet();
  await assert.rejects(chat.done, { name: "AbortError" });
  assert.equal(streams, 1, "no second events request after close()");
  assert.deepEqual(calls, []);
});

test("a stream given an already aborted signal rejects at once, over fetch and over EventSource", async (t) => {
  t.after(() => delete globalThis.EventSource);
  globalThis.EventSource = FakeEventSource;
  FakeEventSource.made = [];
  let streams = 0;
  const fetchImpl = async () => {
    streams += 1;
    return new Response("");
  };
  const client = createClient({ baseUrl: "http://x", token: "tok", store: memoryStore(), fetch: fetchImpl });
  for (const transport of ["fetch", "eventsource"]) {
    const chat = client.followChat({ id: ID, stream_url: `/v1/chats/${ID}/events?token=s` }, { transport });
    chat.close();
    await assert.rejects(chat.done, { name: "AbortError" });
  }
  assert.equal(streams, 0);
  assert.equal(FakeEventSource.made.length, 0);
});

/** A fetch for the stream whose events requests fail (no answer) while `down()`; then one whole answer. */
function downThenUp(down, tries) {
  return async (url) => {
    const path = new URL(url).pathname;
    if (path === "/v1/chats") return json(202, { id: ID, status: "queued", stream_url: `/v1/chats/${ID}/events?token=s` });
    tries.push(Date.now());
    if (down()) throw new TypeError("Failed to fetch");
    return new Response(sse("1-0", "started", { attempt: 1, model: "m" }) + content("2-0", "back") + sse("3-0", "complete", { attempt: 1 }));
  };
}

async function runUntil(promise, stepMs, maxMs) {
  let settled = false;
  promise.then(() => (settled = true), () => (settled = true));
  for (let t = 0; t < maxMs && !settled; t += stepMs) {
    mock.timers.tick(stepMs);
    await turns(10);
  }
  return promise;
}

test("a minute of failed connections (an edge redeploy, a dead zone) is waited out, not the end", async (t) => {
  t.after(() => mock.timers.reset());
  mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  const tries = [];
  const start = Date.now();
  const client = createClient({ baseUrl: "http://x", token: "tok", store: memoryStore(), fetch: downThenUp(() => Date.now() - start < 60_000, tries) });
  const states = [];
  const chat = await client.createChat({ message: "hi", transport: "fetch", onConnection: (c) => states.push(c.state) });
  const result = await runUntil(chat.done, 500, 200_000);
  assert.equal(result.text, "back");
  assert.ok(tries.length < 40, `backed off to seconds between tries, not ${tries.length} tries in a minute`);
  assert.equal(states.at(-1), "closed");
});

test("failures go on for retryForMs (default 5 minutes) before stream_lost", async (t) => {
  t.after(() => mock.timers.reset());
  mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  const tries = [];
  const client = createClient({ baseUrl: "http://x", token: "tok", store: memoryStore(), fetch: downThenUp(() => true, tries) });
  const chat = await client.createChat({ message: "hi", transport: "fetch" });
  const start = Date.now();
  const error = await runUntil(chat.done, 1000, 600_000).then(() => null, (e) => e);
  assert.equal(error?.code, "stream_lost");
  const lasted = Date.now() - start;
  assert.ok(lasted >= 300_000 && lasted < 330_000, `gave up after ${lasted} ms`);
  const gaps = tries.slice(1).map((at, i) => at - tries[i]);
  assert.ok(Math.max(...gaps) <= 15_000 && Math.max(...gaps) >= 7_500, String(gaps));
});

test("offline is reported, and the stream still tries every ~10 s; time offline is not counted", async (t) => {
  const had = Object.getOwnPropertyDescriptor(globalThis, "navigator");
  let onLine = false;
  Object.defineProperty(globalThis, "navigator", { configurable: true, get: () => ({ onLine }) });
  t.after(() => {
    mock.timers.reset();
    if (had) Object.defineProperty(globalThis, "navigator", had);
    else delete globalThis.navigator;
  });
  mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  const tries = [];
  const start = Date.now();
  // offline (no answer) for 10 minutes, longer than retryForMs: it does not count
  const client = createClient({ baseUrl: "http://x", token: "tok", store: memoryStore(), fetch: downThenUp(() => Date.now() - start < 600_000, tries) });
  const states = [];
  const chat = await client.createChat({ message: "hi", transport: "fetch", onConnection: (c) => states.push(c.state) });
  for (let s = 0; s < 600; s++) {
    mock.timers.tick(1000);
    await turns(10);
  }
  assert.ok(states.includes("offline"), String(states));
  assert.ok(tries.length >= 50, `tried ${tries.length} times in 10 minutes offline: every ~10 s, the hint is not trusted forever`);
  onLine = true;
  const result = await runUntil(chat.done, 1000, 60_000);
  assert.equal(result.text, "back");
});

test("a renderer that clears in onAttempt shows the answer, when the new attempt has no text", async () => {
  // attempt 1 streams text, its worker is lost, attempt 2 answers with a tool call only
  const stream =
    sse("1-0", "started", { attempt: 1, model: "m" }) +
    content("2-0", "half an answ") +
    sse("3-0", "status", { message: "worker lost; attempt 2 of 3", attempt: 2 }) +
    sse("4-0", "started", { attempt: 2, model: "m" }) +
    sse("5-0", "tool_call", { index: 0, id: "call_1", name: "lookup", arguments: "{}", attempt: 2 }) +
    sse("6-0", "complete", { attempt: 2, finish_reason: "tool_calls" });
  const client = createClient({ baseUrl: "http://x", token: "t", store: memoryStore(), fetch: scripted([stream], []) });
  let shown = "";
  const log = [];
  const chat = await client.createChat({
    message: "hi",
    transport: "fetch",
    onContent: (_piece, _event, text) => (shown = text),
    onAttempt: (n, current) => {
      log.push(`attempt ${n} text=${JSON.stringify(current.text)}`);
      shown = ""; // the README's pattern
    },
    onComplete: (result) => (shown = result.text),
  });
  const result = await chat.done;
  assert.equal(result.text, "");
  assert.equal(shown, "");
  assert.deepEqual(log, ['attempt 2 text=""']);
  assert.equal(result.toolCalls[0].function.name, "lookup");
});

test("auto, with no token to ask the API with (a stream_url from a backend), follows over fetch and resumes a half-open stream", async (t) => {
  t.after(() => delete globalThis.EventSource);
  globalThis.EventSource = FakeEventSource;
  FakeEventSource.made = [];
  const encoder = new TextEncoder();
  const seen = [];
  const fetchImpl = async (url, init = {}) => {
    const where = new URL(url);
    assert.equal(where.pathname, `/v1/chats/${ID}/events`);
    assert.equal(where.searchParams.get("token"), "s");
    assert.equal(init.headers.Authorization, undefined);
    seen.push(init.headers["Last-Event-ID"] ?? null);
    if (seen.length === 1) {
      // the first connection goes silent mid-answer and stays open (a half-open socket)
      const body = new ReadableStream({
        start: (c) => c.enqueue(encoder.encode(sse("1-0", "started", { attempt: 1, model: "m" }) + content("2-0", "Hel"))),
      });
      return new Response(body, { status: 200 });
    }
    return new Response(content("3-0", "lo") + sse("4-0", "complete", { attempt: 1 }), { status: 200 });
  };
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), readTimeoutMs: 50, fetch: fetchImpl });
  const chat = client.followChat({ id: ID, stream_url: `http://x/v1/chats/${ID}/events?token=s` });
  assert.equal((await chat.done).text, "Hello");
  assert.equal(FakeEventSource.made.length, 0, "not EventSource: it would hide the pings");
  assert.deepEqual(seen, [null, "2-0"]);
});

test("over EventSource with no token, a silent stream is opened again after the last event, not left for good", async (t) => {
  t.after(() => {
    mock.timers.reset();
    delete globalThis.EventSource;
  });
  globalThis.EventSource = FakeEventSource;
  FakeEventSource.made = [];
  mock.timers.enable({ apis: ["setTimeout"] });
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), readTimeoutMs: 1000, fetch: async () => assert.fail("no fetch") });
  const states = [];
  const chat = client.followChat({ id: ID, stream_url: `/v1/chats/${ID}/events?token=s` }, { transport: "eventsource", onConnection: (c) => states.push(c.state) });
  await turns();
  const [first] = FakeEventSource.made;
  first.open();
  first.send("1-0", "started", { attempt: 1, model: "m" });
  first.send("2-0", "content", { content: "Hel", index: 1, attempt: 1 });
  mock.timers.tick(1000);
  await turns();
  assert.equal(first.closed, true);
  const second = FakeEventSource.made[1];
  assert.equal(second?.url.searchParams.get("last_event_id"), "2-0");
  second.open();
  second.send("3-0", "content", { content: "lo", index: 2, attempt: 1 });
  second.send("4-0", "complete", { attempt: 1 });
  assert.equal((await chat.done).text, "Hello");
  assert.ok(!states.includes("reconnecting"), String(states));
});

test("for await over a failed chat yields its events, the failed one too, then throws chat_failed", async () => {
  const stream = sse("1-0", "started", { attempt: 1, model: "m" }) + content("2-0", "partial") + sse("3-0", "failed", { message: "upstream said no", attempts: 3 });
  const client = createClient({ baseUrl: "http://x", token: "t", store: memoryStore(), fetch: scripted([stream], []) });
  const chat = await client.createChat({ message: "hi", transport: "fetch" });
  const types = [];
  const thrown = await (async () => {
    for await (const event of chat) types.push(event.type);
  })().then(() => null, (e) => e);
  assert.deepEqual(types, ["started", "content", "failed"]);
  assert.equal(thrown?.code, "chat_failed");
  assert.equal(thrown.message, "upstream said no");
  await assert.rejects(chat.done, (e) => e === thrown);
});

test("over EventSource, a silence while the server moved to a later attempt (with less text) reconnects", async (t) => {
  t.after(() => {
    mock.timers.reset();
    delete globalThis.EventSource;
  });
  globalThis.EventSource = FakeEventSource;
  FakeEventSource.made = [];
  mock.timers.enable({ apis: ["setTimeout"] });
  const client = createClient({
    baseUrl: "http://x",
    token: "t",
    store: memoryStore(),
    readTimeoutMs: 1000,
    fetch: apiOnly(() => ({ status: "running", attempts: 2, content: "short" })),
  });
  const chat = client.followChat({ id: ID, stream_url: `/v1/chats/${ID}/events?token=s` }, { transport: "eventsource" });
  await turns();
  const [first] = FakeEventSource.made;
  first.open();
  first.send("1-0", "started", { attempt: 1, model: "m" });
  first.send("2-0", "content", { content: "a longer first attempt", index: 1, attempt: 1 });
  mock.timers.tick(1000);
  await turns();
  mock.timers.tick(1000); // the same answer after a second silence: not an event on its way
  await turns();
  assert.equal(first.closed, true, "attempt 2 began on the server and its start never came: the stream is dead");
  chat.close();
  await chat.done.catch(() => {});
});

test("aborted while its POST is out: the chat it made is cancelled, not left running unreachable", async () => {
  for (const idempotencyKey of [undefined, "caller-key"]) {
    let release;
    let postSignal = "unset";
    const cancelled = [];
    const fetchImpl = async (url, init = {}) => {
      const path = new URL(url).pathname;
      if (path === "/v1/chats") {
        postSignal = init.signal;
        await new Promise((resolve) => (release = resolve)); // the server made it; its answer is slow
        return json(202, { id: ID, status: "queued", stream_url: `/v1/chats/${ID}/events?token=s` });
      }
      if (path === `/v1/chats/${ID}/cancel` && init.method === "POST") {
        cancelled.push(ID);
        return json(202, { id: ID, status: "cancelled" });
      }
      throw new Error(`unexpected ${init.method} ${url}`);
    };
    const client = createClient({ baseUrl: "http://x", token: "tok", store: memoryStore(), fetch: fetchImpl });
    const controller = new AbortController();
    const creating = client.createChat({ message: "hi", transport: "fetch", signal: controller.signal, idempotencyKey });
    while (!release) await turns(1);
    controller.abort();
    await assert.rejects(creating, { name: "AbortError" }); // at once, not when the POST answers
    assert.ok(!postSignal?.aborted, "the POST under way is not cut: its answer says which chat it made");
    release();
    await turns(10);
    // without a caller's key, no one can reach that chat: cancelled. With one, the next call with
    // that key (StrictMode's second run) follows it: left alone.
    assert.deepEqual(cancelled, idempotencyKey === undefined ? [ID] : []);
    assert.equal(client.savedChat(), null);
  }
});

test("the queue's place is asked less and less often, and a 429's Retry-After is honoured", async (t) => {
  t.after(() => mock.timers.reset());
  mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
  const asks = [];
  let limited = false;
  const fetchImpl = async (url) => {
    const path = new URL(url).pathname;
    if (path === "/v1/chats") return json(202, { id: ID, status: "queued", stream_url: `/v1/chats/${ID}/events?token=s` });
    if (path === `/v1/chats/${ID}`) {
      asks.push(Date.now());
      if (limited) {
        limited = false;
        return new Response(JSON.stringify({ error: { code: "rate_limited", message: "slow down" } }), {
          status: 429,
          headers: { "Retry-After": "30" },
        });
      }
      return json(200, { id: ID, status: "queued", content: "", queue_position: 5 });
    }
    return new Response(new ReadableStream({ start() {} }), { status: 200 }); // the stream: quiet while queued
  };
  const client = createClient({ baseUrl: "http://x", token: "tok", store: memoryStore(), readTimeoutMs: 10 ** 9, fetch: fetchImpl });
  const chat = await client.createChat({ message: "hi", transport: "fetch", onQueued: () => {} });
  for (let s = 0; s < 60; s++) {
    mock.timers.tick(1000);
    await turns(5);
  }
  assert.ok(asks.length <= 15, `asked ${asks.length} times in a minute, not once a second`);
  const gaps = asks.slice(1).map((at, i) => at - asks[i]);
  assert.ok(gaps.at(-1) >= 5000, String(gaps));
  limited = true;
  const before = asks.length;
  for (let s = 0; s < 40 && asks.length === before; s++) {
    mock.timers.tick(1000);
    await turns(5);
  }
  const limitedAt = asks.at(-1);
  for (let s = 0; s < 60 && asks.at(-1) === limitedAt; s++) {
    mock.timers.tick(1000);
    await turns(5);
  }
  assert.ok(asks.at(-1) - limitedAt >= 30_000, `asked again ${asks.at(-1) - limitedAt} ms after a 429 with Retry-After: 30`);
  chat.close();
  await chat.done.catch(() => {});
});

test("a 403 or 401 that ends the stream forgets the saved record, and no save is left pending", { timeout: 10_000 }, async (t) => {
  for (const status of [401, 403]) {
    const store = memoryStore();
    const partial = content("1-0", "Hel");
    // a 401 asks for a fresh stream URL once; a second 401 is the end
    const client = createClient({ baseUrl: "http://x", store, token: "tok", fetch: scripted([partial, status, status], []) });
    const chat = client.followChat({ id: ID }, { transport: "fetch" });
    const error = await chat.done.then(() => null, (e) => e);
    assert.equal(error?.status, status);
    assert.equal(client.savedChat(), null, `a reload would get ${status} again: nothing to resume`);
    assert.equal(chat._saveTimer, null);
  }
  t.mock.timers.enable({ apis: ["setTimeout"] });
  const client = createClient({ baseUrl: "http://x", store: memoryStore(), token: "tok", fetch: scripted([content("1-0", "a") + sse("2-0", "complete", { attempt: 1 })], []) });
  const chat = client.followChat({ id: ID }, { transport: "fetch", persist: false });
  await turns(20);
  assert.equal(chat._saveTimer, null, "persist: false: no save timer");
  t.mock.timers.reset();
  await chat.done;
});
