// Drives the gateway with the official Node `openai` SDK and prints what it saw as one JSON line.
// Usage: node chat.mjs BASE_URL API_KEY
import OpenAI from "openai";

const [baseURL, apiKey] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0 });
const messages = [{ role: "user", content: "one two three four" }];

const whole = await client.chat.completions.create({ model: "echo", messages, max_tokens: 10 });

const deltas = [];
let usage = null;
const stream = await client.chat.completions.create({
  model: "echo", messages, stream: true, stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  if (chunk.usage) usage = chunk.usage;
  for (const choice of chunk.choices) if (choice.delta.content) deltas.push(choice.delta.content);
}

let authError = null;
try {
  await new OpenAI({ baseURL, apiKey: "ipk-wrong", maxRetries: 0 }).models.list();
} catch (err) {
  authError = { name: err.constructor.name, status: err.status };
}

const models = [];
for await (const model of client.models.list()) models.push(model.id);

console.log(JSON.stringify({ whole: whole.choices[0].message.content, deltas, usage, authError, models }));
