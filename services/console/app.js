// The web console: reads the endpoint's own HTTP API (OpenAI routes, /api/*); no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("internlm-api-key") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("internlm-api-key", keyInput.value);
  showError("");
  refresh();
});

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (keyInput.value) h.Authorization = `Bearer ${keyInput.value}`;
  return h;
}

function showError(message) {
  const el = $("error");
  el.textContent = message || "";
  el.hidden = !message;
}

// The server's own message; on 401 (no key, or a wrong one) the key field is where to act.
function failure(response, body) {
  if (response.status === 401) keyInput.focus();
  return new Error((body.error && body.error.message) || `${response.status} ${response.statusText}`);
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw failure(response, body);
  return body;
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  return td;
}

function fill(table, rows) {
  const tbody = $(table).querySelector("tbody");
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = document.createElement("tr");
    tr.append(...cells.map((c) => (c instanceof Node ? wrap(c) : cell(c))));
    return tr;
  }));
}

function wrap(node) {
  const td = document.createElement("td");
  td.append(node);
  return td;
}

// ---- tabs
let current = "models";
document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => {
  document.querySelectorAll("nav button").forEach((x) => x.classList.toggle("active", x === b));
  document.querySelectorAll(".tab").forEach((t) => { t.hidden = t.id !== b.dataset.tab; });
  current = b.dataset.tab;
  refresh();
}));

// ---- models and workers
async function refreshModels() {
  const [models, workers] = await Promise.all([api("/v1/models"), api("/api/workers")]);
  fill("model-table", models.data.map((m) => [m.id, m.parent || "", m.max_model_len]));
  fill("worker-table", workers.workers.map((w) => [w.address, w.model, w.precision, w.load, w.max_batch,
                                                    w.inflight, w.requests_routed]));
  const select = $("chat-model");
  const chosen = select.value;
  select.replaceChildren(...models.data.map((m) => new Option(m.id, m.id)));
  if (models.data.some((m) => m.id === chosen)) select.value = chosen;
}

// ---- chat playground: streamed chat completions
let history = [];
let controller = null;

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("chat-log").append(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return div;
}

$("chat-clear").addEventListener("click", () => {
  history = [];
  $("chat-log").replaceChildren();
  $("chat-usage").textContent = "";
});

$("chat-stop").addEventListener("click", () => controller && controller.abort());

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("chat-input").value;
  if (!text) return;
  $("chat-input").value = "";
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  const messages = $("chat-system").value ? [{ role: "system", content: $("chat-system").value }, ...history] : history;
  controller = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  showError("");
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), signal: controller.signal,
      body: JSON.stringify({ model: $("chat-model").value, messages, stream: true,
                             temperature: Number($("chat-temperature").value),
                             max_tokens: Number($("chat-max").value), stream_options: { include_usage: true } }),
    });
    if (!response.ok) {
      throw failure(response, await response.json().catch(() => ({})));
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/^data: /, "");
        buffer = buffer.slice(end + 2);
        if (line === "[DONE]") continue;
        const chunk = JSON.parse(line);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) {
          answer += (choice.delta && choice.delta.content) || "";
          out.textContent = answer;
        }
        if (chunk.usage) {
          $("chat-usage").textContent = `${chunk.usage.prompt_tokens} prompt + ${chunk.usage.completion_tokens} completion tokens`;
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(`chat: ${e.message}`);
  } finally {
    history.push({ role: "assistant", content: answer });
    controller = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
});

// ---- jobs: list with live progress, a loss curve per fine-tune, submit and cancel
const losses = {};  // job id -> [[step, loss], ...]: the Jobs API's curve, then what this page sees
let selected = null;

const TEMPLATES = {
  convert: { source: "", output: "" },
  finetune: { base_model: "", dataset: "", output: "", method: "lora", max_steps: 100 },
  preprocess: { source: "", output: "", format: "alpaca" },
  export: { model: "", output: "" },
};
$("job-kind").addEventListener("change", () => {
  $("job-fields").value = JSON.stringify(TEMPLATES[$("job-kind").value]);
});

$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("");
  try {
    const fields = JSON.parse($("job-fields").value);
    const job = await api("/api/jobs", { method: "POST", body: JSON.stringify({ [$("job-kind").value]: fields }) });
    selected = job.id;
    refresh();
  } catch (e) {
    showError(`submit: ${e.message}`);
  }
});

function progressText(job) {
  const p = job.progress || {};
  if (p.total_steps) return `${p.step || 0}/${p.total_steps}`;
  if (p.fraction !== undefined) return `${Math.round(100 * p.fraction)}%`;
  return "";
}

async function refreshJobs() {
  const list = await api("/api/jobs?limit=50");
  const jobs = list.jobs || [];
  for (const job of jobs) {
    const p = job.progress || {};
    if (p.loss !== undefined && p.step) {
      const seen = (losses[job.id] = losses[job.id] || []);
      if (!seen.length || seen[seen.length - 1][0] !== Number(p.step)) seen.push([Number(p.step), p.loss]);
    }
  }
  fill("job-table", jobs.map((job) => {
    const open = document.createElement("button");
    open.textContent = job.state === "JOB_STATE_RUNNING" || job.state === "JOB_STATE_QUEUED" ? "cancel" : "";
    open.hidden = !open.textContent;
    open.addEventListener("click", async (e) => {
      e.stopPropagation();
      try { await api(`/api/jobs/${job.id}/cancel`, { method: "POST" }); } catch (err) { showError(err.message); }
      refresh();
    });
    const p = job.progress || {};
    return [job.id, (job.kind || "").replace("JOB_KIND_", "").toLowerCase(),
            (job.state || "").replace("JOB_STATE_", "").toLowerCase(), progressText(job),
            p.loss === undefined ? "" : p.loss.toFixed(4), job.error || job.message || "", open];
  }));
  $("job-table").querySelectorAll("tbody tr").forEach((tr, i) => {
    tr.classList.toggle("selected", jobs[i].id === selected);
    tr.addEventListener("click", () => { selected = jobs[i].id; refreshJobs(); });
  });
  const job = jobs.find((j) => j.id === selected);
  $("job-detail").hidden = !job;
  if (job) {
    $("job-detail-id").textContent = job.id;
    $("job-detail-text").textContent = `${(job.state || "").replace("JOB_STATE_", "").toLowerCase()}` +
      `${job.output ? `, output ${job.output}` : ""}${job.error ? `, error: ${job.error}` : ""}`;
    drawLoss(losses[job.id] || []);
    // the whole curve, from the Jobs API: every step's loss, also those reported before this page opened
    const detail = await api(`/api/jobs/${job.id}`);
    if (detail.loss_curve && detail.loss_curve.length && selected === job.id) {
      losses[job.id] = detail.loss_curve.map((p) => [Number(p.step), Number(p.loss)]);
      drawLoss(losses[job.id]);
    }
  }
}

function drawLoss(points) {
  const svg = $("loss-chart");
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const W = 600, H = 220, pad = 36;
  if (points.length < 1) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", pad); t.setAttribute("y", H / 2);
    t.textContent = "no loss reported yet";
    svg.append(t);
    return;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const X = (x) => pad + ((x - x0) / (x1 - x0)) * (W - 2 * pad);
  const Y = (y) => H - pad - ((y - y0) / (y1 - y0)) * (H - 2 * pad);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points.map((p) => `${X(p[0])},${Y(p[1])}`).join(" "));
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#2a62c9");
  line.setAttribute("stroke-width", "2");
  svg.append(line);
  for (const [x, y, label] of [[pad, H - 8, `step ${x0}`], [W - pad - 60, H - 8, `step ${x1}`],
                               [2, Y(y1) + 4, y1.toFixed(3)], [2, Y(y0), y0.toFixed(3)]]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.setAttribute("font-size", "11");
    t.textContent = label;
    svg.append(t);
  }
}

// ---- store
async function refreshStore() {
  const store = await api("/api/store");
  fill("store-table", (store.entries || []).map((e) => [e.area, e.name, e.kind, size(Number(e.size_bytes || 0)),
                                                        new Date(1000 * (e.modified_at || 0)).toLocaleString()]));
}

function size(n) {
  for (const unit of ["B", "KB", "MB", "GB"]) {
    if (n < 1024 || unit === "GB") return `${n.toFixed(unit === "B" ? 0 : 1)} ${unit}`;
    n /= 1024;
  }
  return String(n);
}

// ---- polling
const REFRESH = { models: refreshModels, chat: refreshModels, jobs: refreshJobs, store: refreshStore };
async function refresh() {
  try {
    await REFRESH[current]();
    if (!controller && $("error").textContent.startsWith("refresh")) showError("");
  } catch (e) {
    showError(`refresh: ${e.message}`);
  }
}
refresh();
setInterval(() => {
  if (current !== "chat") refresh();
  if (current !== "jobs") refreshJobs().catch(() => {});  // keep collecting loss points
}, 1500);
