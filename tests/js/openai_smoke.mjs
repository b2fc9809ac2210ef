// Drives the gateway's OpenAI routes with the official JS client and prints what it saw as JSON.
// Usage: node openai_smoke.mjs BASE_URL CHAT_MODEL EMBED_MODEL
import OpenAI from "openai";

const [baseURL, chatModel, embedModel] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0, timeout: 30_000 });
const messages = [{ role: "user", content: "Recommend a novel." }];

const chat = await client.chat.completions.create({ model: chatModel, messages, seed: 1 });

const stream = await client.chat.completions.create({
  model: chatModel,
  messages,
  stream: true,
  stream_options: { include_usage: true },
});
const chunks = [];
for await (const chunk of stream) chunks.push(chunk);

const embeddings = await client.embeddings.create({ model: embedModel, input: ["a red fox", "a dog"] });
const models = [];
for await (const model of client.models.list()) models.push(model.id);

let missing = null;
try {
  await client.chat.completions.create({ model: "nobody-serves-this", messages });
} catch (error) {
  missing = { name: error.constructor.name, status: error.status, type: error.type };
}

console.log(
  JSON.stringify({
    chat: {
      id: chat.id,
      object: chat.object,
      content: chat.choices[0].message.content,
      finish: chat.choices[0].finish_reason,
      usage: chat.usage,
    },
    stream: {
      ids: [...new Set(chunks.map((c) => c.id))],
      firstRole: chunks[0].choices[0]?.delta?.role ?? null,
      text: chunks.map((c) => c.choices[0]?.delta?.content ?? "").join(""),
      finishes: chunks.filter((c) => c.choices.length).map((c) => c.choices[0].finish_reason),
      lastUsage: chunks.at(-1).usage ?? null,
      lastChoices: chunks.at(-1).choices.length,
    },
    embeddings: {
      indexes: embeddings.data.map((d) => d.index),
      lengths: embeddings.data.map((d) => d.embedding.length),
      finite: embeddings.data.every((d) => d.embedding.every(Number.isFinite)),
      usage: embeddings.usage,
    },
    models,
    missing,
  }),
);
