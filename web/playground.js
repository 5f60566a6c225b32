// The playground: one column per model (two side by side when two are loaded), each streaming from the server's
// own OpenAI-compatible POST /v1/completions with stream and logprobs. Plain JavaScript, no build step, no network
// beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const TOP_ALTERNATIVES = 5; // logprobs asked for: the alternatives shown on hover
const BUCKETS = [0.01, 0.1, 0.3, 0.6, 0.9]; // probability edges of the colours --p0 .. --p5

let models = [];
let columns = [];
let controller = null; // aborts the running generation (Stop): the server stops generating for a closed stream

// ------------------------------------------------------------------------------------------------------------
// Talking to the server

function headers() {
  const key = $("api_key").value.trim();
  const base = { "Content-Type": "application/json" };
  return key ? { ...base, Authorization: `Bearer ${key}` } : base;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) {
    $("key-label").hidden = false;
    $("status").textContent = "This server needs an API key: enter it above.";
    return;
  }
  if (!response.ok) {
    $("status").textContent = await errorMessage(response);
    return;
  }
  $("status").textContent = "";
  models = (await response.json()).data;
  buildColumns();
}

// Server-sent events from a fetch body: each `data: ...` line handed to onData, until `data: [DONE]`.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Columns

function buildColumns() {
  const main = $("columns");
  main.replaceChildren();
  columns = models.slice(0, 2).map((model, i) => {
    const column = document.createElement("section");
    column.className = "column";
    column.innerHTML = `<header><select aria-label="model"></select><span class="meta"></span></header>
      <div class="error"></div><div class="output"></div><div class="stats"></div>`;
    const select = column.querySelector("select");
    for (const m of models) select.add(new Option(m.id, m.id));
    select.selectedIndex = i;
    const parts = {
      select,
      meta: column.querySelector(".meta"),
      error: column.querySelector(".error"),
      output: column.querySelector(".output"),
      stats: column.querySelector(".stats"),
    };
    select.addEventListener("change", () => describe(parts));
    describe(parts);
    main.appendChild(column);
    return parts;
  });
}

function describe(column) {
  const model = models.find((m) => m.id === column.select.value);
  const params = model.parameters >= 1e6 ? `${(model.parameters / 1e6).toFixed(1)}M` : `${(model.parameters / 1e3).toFixed(0)}k`;
  column.meta.textContent = `${params} parameters · ${model.shape} · context ${model.context_len} · ${model.tokenizer} tokens`;
}

// ------------------------------------------------------------------------------------------------------------
// Generating

function request(model) {
  const number = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
  const body = {
    model,
    prompt: $("prompt").value,
    max_tokens: number("max_tokens"),
    temperature: number("temperature"),
    top_p: number("top_p"),
    top_k: number("top_k"),
    seed: number("seed"),
    logprobs: TOP_ALTERNATIVES,
    stream: true,
  };
  return body;
}

async function generate(event) {
  event.preventDefault();
  if (controller) controller.abort();
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "";
  // no seed given: one random seed for every column, so the columns differ only by their model
  const seed = $("seed").value.trim() === "" ? Math.floor(Math.random() * 2 ** 31) : null;
  const signal = controller.signal;
  await Promise.all(columns.map((column) => streamInto(column, seed, signal)));
  $("generate").disabled = false;
  $("stop").disabled = true;
}

async function streamInto(column, seed, signal) {
  const body = request(column.select.value);
  if (seed !== null) body.seed = seed;
  column.output.replaceChildren(span("prompt-text", body.prompt));
  column.error.textContent = "";
  column.stats.textContent = "";
  const started = performance.now();
  let count = 0;
  let finish = null;
  const showStats = () => {
    const seconds = (performance.now() - started) / 1000;
    const rate = count / Math.max(seconds, 1e-3);
    column.stats.textContent = `${count} tokens · ${seconds.toFixed(1)} s · ${rate.toFixed(0)} tok/s · seed ${body.seed}` +
      (finish ? ` · finish: ${finish}` : "");
  };
  try {
    const response = await fetch("/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
    if (!response.ok) {
      column.error.textContent = await errorMessage(response);
      if (response.status === 401) $("key-label").hidden = false;
      return;
    }
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        count += appendChoice(column.output, choice);
        finish = choice.finish_reason || finish;
      }
      showStats();
    });
  } catch (error) {
    if (error.name !== "AbortError") column.error.textContent = String(error.message || error);
  }
  showStats();
}

// One streamed choice: its text cut into one coloured span per token (text_offset counts code points from the
// prompt's start). Returns how many tokens it held.
function appendChoice(output, choice) {
  const lp = choice.logprobs;
  if (!lp || lp.tokens.length === 0) {
    if (choice.text) output.appendChild(document.createTextNode(choice.text));
    return 0;
  }
  const chars = Array.from(choice.text);
  const base = lp.text_offset[0];
  lp.tokens.forEach((token, i) => {
    const from = lp.text_offset[i] - base;
    const to = i + 1 < lp.tokens.length ? lp.text_offset[i + 1] - base : chars.length;
    const text = chars.slice(from, to).join("");
    if (!text) return; // part of a character the next token completes
    const p = Math.exp(lp.token_logprobs[i]);
    const element = span("token", text);
    element.style.background = `var(--p${BUCKETS.filter((edge) => p >= edge).length})`;
    element.tokenInfo = { token, p, top: lp.top_logprobs[i] };
    output.appendChild(element);
  });
  return lp.tokens.length;
}

function span(className, text) {
  const element = document.createElement("span");
  element.className = className;
  element.textContent = text;
  return element;
}

// ------------------------------------------------------------------------------------------------------------
// The tooltip: the alternatives the model considered for a token

const visible = (text) => text.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/ /g, "␣") || "∅";
const percent = (p) => (p >= 0.001 ? `${(100 * p).toFixed(1)}%` : `${(100 * p).toExponential(0)}%`);

function showTip(element) {
  const info = element.tokenInfo;
  const tip = $("tip");
  const title = document.createElement("div");
  title.className = "title";
  title.textContent = `chosen: ${visible(info.token)} (${percent(info.p)})`;
  tip.replaceChildren(title);
  const alternatives = Object.entries(info.top).sort((a, b) => b[1] - a[1]);
  for (const [token, logprob] of alternatives) {
    const p = Math.exp(logprob);
    const row = document.createElement("div");
    row.className = token === info.token ? "alt chosen" : "alt";
    const code = document.createElement("code");
    code.textContent = visible(token);
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.style.width = `${Math.max(1, 100 * p)}%`;
    row.append(code, span("pct", percent(p)), bar);
    tip.appendChild(row);
  }
  const box = element.getBoundingClientRect();
  tip.style.left = `${window.scrollX + box.left}px`;
  tip.style.top = `${window.scrollY + box.bottom + 6}px`;
  tip.hidden = false;
}

document.addEventListener("mouseover", (event) => {
  const target = event.target;
  if (target.classList && target.classList.contains("token") && target.tokenInfo) showTip(target);
  else $("tip").hidden = true;
});

// ------------------------------------------------------------------------------------------------------------

$("controls").addEventListener("submit", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("controls").requestSubmit();
});
$("api_key").value = localStorage.getItem("pair-api-key") || "";
$("api_key").addEventListener("change", () => {
  localStorage.setItem("pair-api-key", $("api_key").value.trim());
  loadModels();
});
loadModels();
