// streambridge.js without a browser (node --test): the resume rules against a scripted fetch.
import assert from "node:assert/strict";
import { test } from "node:test";
import { createClient, memoryStore, SSEParser } from "../../../api/static/client/streambridge.js";

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
