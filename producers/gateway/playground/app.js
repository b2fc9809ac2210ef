// The playground: submit a generate task, follow its events over SSE (its place in line while
// it waits, then its tokens), show the queues.
// fetch() reads the SSE stream (EventSource cannot send an Authorization header).
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("corral-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("corral-key", keyInput.value));

let current = null; // {id, controller}

function headers(extra = {}) {
  const h = { ...extra };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

async function refreshQueues() {
  try {
    const reply = await fetch("/v1/queues", { headers: headers() });
    if (!reply.ok) { setStatus("queues: HTTP " + reply.status); return; }
    const data = await reply.json();
    const select = $("model");
    const chosen = select.value;
    const models = data.queues.filter((q) => q.workers > 0).map((q) => q.model);
    if (select.options.length !== models.length ||
        [...select.options].some((o, i) => o.value !== models[i])) {
      select.replaceChildren(...models.map((m) => new Option(m, m)));
      if (models.includes(chosen)) select.value = chosen;
    }
    $("queues").replaceChildren(...data.queues.map((q) => {
      const row = document.createElement("tr");
      row.dataset.model = q.model;
      for (const value of [q.model, q.waiting, q.pending, q.workers, q.slots]) {
        const cell = document.createElement("td");
        cell.textContent = value;
        row.append(cell);
      }
      return row;
    }));
  } catch (err) {
    setStatus("queues: " + err);
  }
}

async function followEvents(taskId, controller) {
  const reply = await fetch(`/v1/tasks/${taskId}/events`,
                            { headers: headers({ Accept: "text/event-stream" }),
                              signal: controller.signal });
  if (!reply.ok) throw new Error("events: HTTP " + reply.status);
  const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (data) handle(JSON.parse(data));
    }
  }
}

// "~40 s", "~3 min", "~2 h", as the CLI says it.
function about(seconds) {
  if (seconds < 90) return `~${Math.max(1, Math.round(seconds))} s`;
  if (seconds < 5400) return `~${Math.round(seconds / 60)} min`;
  return `~${Math.round(seconds / 3600)} h`;
}

// A queued event: the task's place in line while it waits, and when it should start.
function describeQueued(event) {
  let text = `queued: position ${event.position}` + (event.position === 0 ? " (next)" : "");
  if (event.eta_s !== null && event.eta_s !== undefined) {
    text += event.eta_s <= 0 ? ", starts now" : `, starts in ${about(event.eta_s)}`;
  }
  return text;
}

function handle(event) {
  const out = $("output");
  switch (event.type) {
    case "queued": setStatus(describeQueued(event)); break;
    case "start": setStatus("running on " + (event.worker || "a worker")); break;
    case "token": out.textContent += event.text; break;
    case "restart": out.textContent = ""; setStatus("restarting: " + event.reason); break;
    case "done": setStatus("done (" + (event.result.done_reason || "stop") + ")"); finish(); break;
    case "error": setStatus("failed: " + event.error.message); finish(); break;
    case "cancelled": setStatus("cancelled"); finish(); break;
    case "warning": setStatus("queued: " + event.message); break;
  }
}

function finish() {
  $("send").disabled = false;
  $("cancel").disabled = true;
  current = null;
}

async function send() {
  const prompt = $("prompt").value.trim();
  if (!prompt) { setStatus("type a prompt first"); return; }
  $("output").textContent = "";
  $("send").disabled = true;
  setStatus("submitting…");
  const reply = await fetch("/v1/tasks/generate", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({ model: $("model").value, prompt }),
  });
  const body = await reply.json();
  if (reply.status !== 202) {
    setStatus("refused: " + (body.error && body.error.message || reply.status));
    $("send").disabled = false;
    return;
  }
  const controller = new AbortController();
  current = { id: body.id, controller };
  $("task").textContent = `task ${body.id} on ${body.queue}, position ${body.position}`;
  $("cancel").disabled = false;
  setStatus(body.warning ? "queued: " + body.warning : "queued");
  try {
    await followEvents(body.id, controller);
  } catch (err) {
    if (err.name !== "AbortError") setStatus(String(err));
  }
  if (current && current.id === body.id) finish();
}

async function cancel() {
  if (!current) return;
  setStatus("cancelling…");
  await fetch(`/v1/tasks/${current.id}`, { method: "DELETE", headers: headers() });
  // The stream ends by itself with the task's "cancelled" event.
}

$("send").addEventListener("click", send);
$("cancel").addEventListener("click", cancel);
refreshQueues();
setInterval(refreshQueues, 2000);
