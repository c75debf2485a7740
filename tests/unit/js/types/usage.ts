// Compiled (never run) by tests/unit/test_js_client.py with `tsc --noEmit --strict`: the types of
// streambridge.d.ts take what a caller writes, and refuse what is wrong (each @ts-expect-error).
import {
  type ChatEvent,
  type ChatMessage,
  type ChatStream,
  createChat,
  createClient,
  memoryStore,
  StreambridgeError,
} from "../../../../api/static/client/streambridge.js";

const client = createClient({ baseUrl: "http://x", store: memoryStore(), retryForMs: 60_000 });

const messages: ChatMessage[] = [
  { role: "system", content: "be brief" },
  { role: "developer", content: [{ type: "text", text: "answer in French" }] },
  {
    role: "user",
    content: [
      { type: "text", text: "what is in this image" },
      { type: "image_url", image_url: { url: "data:image/png;base64,AAAA", detail: "low" } },
    ],
    name: "ann",
  },
  {
    role: "assistant",
    content: null,
    tool_calls: [{ id: "call_1", type: "function", function: { name: "lookup", arguments: "{}" } }],
  },
  { role: "tool", content: "42", tool_call_id: "call_1" },
];

export async function main(): Promise<void> {
  const chat: ChatStream = await client.createChat({
    messages,
    body: { tools: [] },
    onContent: (piece, event, text) => console.log(piece, event.attempt, text),
    onAttempt: () => console.log("again"),
    onToolCall: (event, calls) => console.log(event.arguments, calls[0]?.function.name),
    onConnection: (c) => c.state === "offline" && console.log(c.retryIn),
    onError: (e) => {
      if (e instanceof StreambridgeError) console.log(e.code, e.result);
    },
  });
  for await (const event of chat) {
    const seen: ChatEvent = event;
    if (seen.type === "complete") console.log(seen.usage?.total_tokens);
    if (seen.type === "tool_call") console.log(seen.name);
  }
  const saved = client.savedChat();
  console.log(saved?.parts?.text);
  const info = await client.getChat(chat.id, { signal: new AbortController().signal });
  console.log(info.attempts);
  const other = await createChat({ message: "x", token: "t", signal: new AbortController().signal });
  other.close();
  console.log(new StreambridgeError(429, "rate_limited", "slow down", { retryAfter: 2 }).retryAfter);

  // @ts-expect-error: not a role
  const bad: ChatMessage = { role: "robot", content: "x" };
  // @ts-expect-error: a tool's answer names its call
  const orphan: ChatMessage = { role: "tool", content: "42" };
  console.log(bad, orphan);
}
