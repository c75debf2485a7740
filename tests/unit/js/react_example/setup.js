// jsdom and a fake streambridge API for harness.jsx (run.sh).
import { JSDOM } from "jsdom";
const dom = new JSDOM("<!doctype html><div id=root></div>", { url: "http://127.0.0.1:5173/" });
globalThis.window = dom.window;
globalThis.document = dom.window.document;
globalThis.sessionStorage = dom.window.sessionStorage;
globalThis.IS_REACT_ACT_ENVIRONMENT = true;
if (process.env.WITH_TOKEN) sessionStorage.setItem("streambridge:token", "tok-1");

// A fake streambridge API: a chat per (user, Idempotency-Key), made when the POST arrives (even if
// the caller then aborts and never reads the answer, as a real server would).
export const server = { visitors: 0, posts: 0, chats: new Map() };
const json = (status, body) => new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } });
const tick = () => new Promise((r) => setTimeout(r, 5));
const sse = (id, type, data) => `id: ${id}\nevent: ${type}\ndata: ${JSON.stringify({ type, ...data })}\n\n`;
globalThis.fetch = async (url, init = {}) => {
  const path = new URL(url).pathname;
  const abortable = async (answer) => {
    await tick();
    init.signal?.throwIfAborted();
    return answer();
  };
  if (path === "/v1/auth/visitor") {
    server.visitors += 1;
    const token = `tok-${server.visitors}`;
    return abortable(() => json(201, { token, user: token }));
  }
  if (path === "/v1/chats" && init.method === "POST") {
    server.posts += 1;
    const key = `${init.headers.Authorization} ${init.headers["Idempotency-Key"]}`;
    if (!server.chats.has(key)) server.chats.set(key, `chat${server.chats.size + 1}`);
    const id = server.chats.get(key);
    return abortable(() => json(202, { id, status: "queued", stream_url: `/v1/chats/${id}/events?token=s` }));
  }
  if (path.endsWith("/events")) {
    const body = sse("1-0", "started", { attempt: 1, model: "m" }) + sse("2-0", "content", { content: "Hello world", index: 1, attempt: 1 }) + sse("3-0", "complete", { attempt: 1 });
    return abortable(() => new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } }));
  }
  return json(404, { error: { code: "not_found", message: path } });
};
