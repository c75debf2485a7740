// The README's React example under <StrictMode>: how many chats does it make? (run.sh runs it)
import { server } from "./setup.js";
import { StrictMode, act } from "react";
import { createRoot } from "react-dom/client";
import { StreamingAnswer } from "./EXAMPLE";

const root = createRoot(document.getElementById("root"));
await act(async () => root.render(<StrictMode><StreamingAnswer prompt="hi" /></StrictMode>));
for (let i = 0; i < 200 && !document.body.textContent.startsWith("complete"); i++) {
  await act(() => new Promise((r) => setTimeout(r, 10)));
}
const result = { chats: server.chats.size, posts: server.posts, visitors: server.visitors, shown: document.body.textContent };
console.log(JSON.stringify(result));
await act(async () => root.unmount());
process.exit(result.chats === 1 && result.shown.trim() === "completeHello world" ? 0 : 1);
