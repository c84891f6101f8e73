// The charlm playground: plain JavaScript with no build step and no third-party code, so the page
// works offline and anyone can read what it sends.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "charlm.apiKey";
const JSON_HEADERS = { "Content-Type": "application/json" };

let limits = null; // the server's limits, from /info
let running = null; // the AbortController of the generation in progress, if any
let models = []; // GET /v1/models' list: what the pickers offer
let cards = new Map(); // model id -> its card from /info (checkpoint, training, vocabulary)
let device = null; // from /info

// ---------------------------------------------------------------- requests and errors

// An error whose message is written for the person at the page, shown as it is.
class UserError extends Error {}

const messageOf = (err) => (err instanceof UserError ? err.message : `Cannot reach the server: ${err.message}`);

// The key lives in sessionStorage: it survives reloads of this tab, and goes with the tab.
const storedKey = () => sessionStorage.getItem(KEY_STORAGE);

// fetch() with the API key. A 401 means the server wants a key (or refused ours): ask for one, then
// send the request again. `init.body` is always a string, so it can be sent twice.
async function api(path, init = {}) {
  for (;;) {
    const headers = new Headers(init.headers);
    const key = storedKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    // Requests run side by side (the model list and card, two scores): one refused with an old key
    // while a new one was being entered just tries the new one, rather than throwing it away.
    if (storedKey() && storedKey() !== key) continue;
    sessionStorage.removeItem(KEY_STORAGE);
    await askForKey(key ? "The server refused that key; enter the right one." : "");
  }
}

// One dialog, however many requests are waiting for the key.
let keyPrompt = null;

function askForKey(message) {
  keyPrompt ||= new Promise((resolve, reject) => {
    const dialog = $("key-dialog");
    const input = $("api-key");
    $("key-error").textContent = message;
    $("key-error").hidden = !message;
    input.value = "";
    const finish = (settle) => {
      $("key-form").onsubmit = dialog.oncancel = null;
      keyPrompt = null;
      settle();
    };
    $("key-form").onsubmit = (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      sessionStorage.setItem(KEY_STORAGE, key);
      dialog.close();
      finish(resolve);
    };
    const refusal = new UserError("This server needs an API key: reload the page to enter it.");
    dialog.oncancel = () => finish(() => reject(refusal));
    dialog.showModal();
    input.focus();
  });
  return keyPrompt;
}

// The error in the service's shape ({"error": {"type", "message", "details"}}), said plainly.
async function errorMessage(response) {
  let error = {};
  try {
    error = (await response.json()).error || {};
  } catch {
    // not JSON (a proxy's page, say): the status line is all there is
  }
  const message = error.message || `${response.status} ${response.statusText}`;
  const retryAfter = response.headers.get("Retry-After") || "a few";
  switch (response.status) {
    case 422: {
      // The details name each field and rule (and unknown characters); the message only the fields.
      const reasons = error.details?.length ? error.details.map(describeDetail) : [message];
      return ["The server refused the request:", ...reasons].join("\n");
    }
    case 429:
      return `The server is busy: ${message}. Retry after ${retryAfter} s.`;
    case 503:
      return `The server is not ready (${message}). Retry after ${retryAfter} s.`;
    default:
      return `Error ${response.status}: ${message}`;
  }
}

function describeDetail(detail) {
  if (detail.unknown_characters) {
    const names = detail.unknown_characters.map(charName).join(", ");
    const shown = detail.unknown_characters.length;
    const more = detail.unknown_count > shown ? ` (the first ${shown} of ${detail.unknown_count})` : "";
    return `${detail.field}: unknown characters ${names}${more}. `
      + "The model knows only the characters of its training text.";
  }
  return `${detail.field}: ${detail.message}`;
}

// A character named so that it can be seen and told apart: “é” (U+00E9), newline, space, …
function charName(char) {
  const names = { "\n": "newline", "\r": "carriage return", "\t": "tab", " ": "space" };
  if (names[char]) return names[char];
  const code = char.codePointAt(0).toString(16).toUpperCase().padStart(4, "0");
  return `“${char}” (U+${code})`;
}

function showError(id, message) {
  $(id).textContent = message;
  $(id).hidden = !message;
}

// Server-Sent Events over fetch (EventSource can neither POST a body nor send a header). An event
// is a block of lines ending in a blank line: `event:` names it, `data:` holds JSON, and a line
// starting with ":" is a keep-alive comment.
async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon === -1 ? line : line.slice(0, colon);
        const text = colon === -1 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

// ---------------------------------------------------------------- generate

const numberOrNull = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));

// The request body for the current settings; optional fields are left out when empty.
function generateBody() {
  const body = {
    ...modelField(pickedModel()),
    seed: $("seed").value,
    length: Number($("length").value),
    scale_factor: Number($("scale-factor").value),
  };
  for (const [field, id] of [["top_k", "top-k"], ["top_p", "top-p"], ["random_seed", "random-seed"]]) {
    const value = numberOrNull(id);
    if (value !== null) body[field] = value;
  }
  const bias = logitBias();
  if (Object.keys(bias).length) body.logit_bias = bias;
  for (const [field, id, off] of STEERING) {
    const value = numberOrNull(id);
    if (value !== null && value !== off) body[field] = value;
  }
  const matched = constraint();
  if (matched) body.constraint = matched;
  return body;
}

// What the pattern box asks for, by kind of constraint.
const CONSTRAINT_PLACEHOLDERS = {
  "": "choose what to match first",
  regex: "(Tom|Sara) went (north|south)\\.",
  choice: "one choice per line",
  json: '{"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}',
};

function constraintKindChanged() {
  const kind = $("constraint-kind").value;
  $("constraint-text").disabled = !kind;
  $("constraint-text").placeholder = CONSTRAINT_PLACEHOLDERS[kind];
}

// `constraint` for the request: null when no kind is chosen or the box is empty. A regex goes as
// typed; choices one a line (empty lines skipped); a schema is parsed here, so a typo is named before
// anything is sent.
function constraint() {
  const kind = $("constraint-kind").value;
  const text = $("constraint-text").value;
  if (!kind || text.trim() === "") return null;
  if (kind === "regex") return { regex: text };
  if (kind === "choice") return { choice: text.split(/\r?\n/).filter((line) => line !== "") };
  try {
    return { json: JSON.parse(text) };
  } catch (err) {
    throw new UserError(`The JSON schema is not valid JSON: ${err.message}`);
  }
}

// The steering settings sent only when they change something: [field, input, its "off" value].
const STEERING = [
  ["presence_penalty", "presence-penalty", 0],
  ["frequency_penalty", "frequency-penalty", 0],
  ["repetition_penalty", "repetition-penalty", 1],
  ["min_p", "min-p", 0],
];
const BAN = -100; // the lowest bias: the character is never drawn
const BOOST = 5; // the boost's bias when its box is left empty

// logit_bias from the two boxes, character by character (code points, as the server counts them):
// every banned character at -100, every boosted one not also banned at the boost's bias.
function logitBias() {
  const bias = {};
  for (const char of $("ban-chars").value) bias[char] = BAN;
  const boost = numberOrNull("boost-bias") ?? BOOST;
  if (boost !== 0) {
    for (const char of $("boost-chars").value) {
      if (!(char in bias)) bias[char] = boost;
    }
  }
  return bias;
}

// Code points, as the server counts characters (a string's length counts UTF-16 units).
const countChars = (text) => Array.from(text).length;

function setStat(name, value) {
  $(`gen-${name}`).textContent = value;
}

function setRunning(on) {
  $("generate").disabled = on;
  $("stop").disabled = !on;
  $("output").setAttribute("aria-busy", String(on));
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  let body;
  try {
    body = generateBody();
  } catch (err) {
    showError("generate-error", messageOf(err)); // a schema that is not JSON: nothing is sent
    return;
  }
  const controller = new AbortController();
  running = controller;
  setRunning(true);
  showError("generate-error", "");
  $("gen-note").hidden = true;
  // The seed is shown dimmed; the generated text grows in one text node (appendData is cheap).
  const seedNode = document.createElement("span");
  seedNode.className = "seed-text";
  seedNode.textContent = body.seed;
  const generated = document.createTextNode("");
  $("output").replaceChildren(seedNode, generated);
  for (const name of ["ttfc", "rate", "chars", "seed", "model"]) setStat(name, "–");
  setStat("state", "waiting…");

  const started = performance.now();
  let first = null; // when the first character arrived, and how many came with it
  let firstChars = 0;
  let chars = 0;
  let finished = false;
  try {
    const response = await api("/generate/stream", {
      method: "POST", headers: JSON_HEADERS, body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) throw new UserError(await errorMessage(response));
    setStat("state", "streaming…");
    for await (const { event: kind, data } of serverEvents(response)) {
      if (kind === "text") {
        const now = performance.now();
        generated.appendData(data.text);
        chars += countChars(data.text);
        if (first === null) {
          first = now;
          firstChars = chars;
          setStat("ttfc", `${Math.round(now - started)} ms`);
        } else if (now > first) {
          // The rate after the first character, so waiting in the queue does not dilute it.
          setStat("rate", Math.round(((chars - firstChars) * 1000) / (now - first)).toLocaleString("en"));
        }
        setStat("chars", chars.toLocaleString("en"));
      } else if (kind === "done") {
        finished = true;
        setStat("seed", String(data.random_seed));
        setStat("model", madeBy(data));
        setStat("state", `done: ${data.finish_reason}`);
        if (body.constraint && data.finish_reason === "length") {
          $("gen-note").textContent = "The match was cut short by the length: the text does not complete it.";
          $("gen-note").hidden = false;
        }
      } else if (kind === "error") {
        throw new UserError(`Generation failed: ${data.error.message}`);
      }
    }
    if (!finished) throw new UserError("The connection closed before the generation finished.");
  } catch (err) {
    if (err.name === "AbortError") {
      setStat("state", "stopped");
    } else {
      setStat("state", "error");
      showError("generate-error", messageOf(err));
      if (first === null) $("output").replaceChildren(); // refused: nothing was generated
    }
  } finally {
    running = null;
    setRunning(false);
    refreshModels(); // the model may have been loaded for this request
  }
}

// Aborting the fetch closes the connection; the server notices and frees the row at once.
function stop() {
  if (running) running.abort();
}

// Scale factor and temperature are one setting (temperature = 1 / scale factor): editing either
// updates the other. Temperature 0 means "always the most likely": the largest scale factor.
const rounded = (x) => String(Number(x.toPrecision(6)));

function scaleChanged() {
  const scale = numberOrNull("scale-factor");
  $("temperature").value = scale > 0 ? rounded(1 / scale) : "";
}

function temperatureChanged() {
  const temperature = numberOrNull("temperature");
  if (temperature === null || temperature < 0) return;
  const maxScale = limits ? limits.max_scale_factor : 10000;
  $("scale-factor").value = temperature === 0 ? String(maxScale) : rounded(Math.min(1 / temperature, maxScale));
}

function newSeed() {
  $("random-seed").value = String(crypto.getRandomValues(new Uint32Array(1))[0]);
}

// ---------------------------------------------------------------- copy curl

const shellQuote = (text) => `'${text.replace(/'/g, "'\\''")}'`;

// The non-streaming request for the current settings. The key itself is never copied (commands end
// up in shell histories and chats): the command reads it from $CHARLM_API_KEY instead.
function curlCommand() {
  const parts = [`curl -s ${shellQuote(`${location.origin}/generate`)}`, "-H 'Content-Type: application/json'"];
  if (storedKey()) parts.push('-H "Authorization: Bearer $CHARLM_API_KEY"');
  parts.push(`-d ${shellQuote(JSON.stringify(generateBody()))}`);
  return parts.join(" \\\n     ");
}

async function copyCurl() {
  let command;
  try {
    command = curlCommand();
  } catch (err) {
    showError("generate-error", messageOf(err)); // a schema that is not JSON
    return;
  }
  const shown = $("curl-command");
  shown.textContent = command;
  shown.hidden = false;
  try {
    await navigator.clipboard.writeText(command); // absent on plain http to a non-local host
    $("copy-status").textContent = "Copied to the clipboard.";
  } catch {
    getSelection().selectAllChildren(shown);
    $("copy-status").textContent = "Copy the selected command below.";
  }
}

// ---------------------------------------------------------------- score

// Surprise in bits, from pale yellow (0: expected) to red (8 or more: a 1-in-256 guess).
const MAX_BITS = 8;

function surpriseColour(bits) {
  const f = Math.min(Math.max(bits, 0) / MAX_BITS, 1);
  return `hsl(${Math.round(55 - 55 * f)} 95% ${Math.round(94 - 34 * f)}%)`;
}

const describeChar = (char) => (char.length === 1 && char.trim() === "" ? charName(char) : `“${char}”`);

// The model's most likely characters at a position, as "“e” 40.2%".
const topGuesses = (top) =>
  (top || []).map((guess) => `${describeChar(guess.char)} ${(Math.exp(guess.logprob) * 100).toFixed(1)}%`);

// One scored character as a coloured span: its surprise in data-bits, its probability and the
// model's guesses in the tooltip. `whose` names the model in the tooltip ("the model's", "b's").
function scoredChar(item, whose) {
  const span = document.createElement("span");
  span.className = "c";
  span.textContent = item.char === "\n" ? "↵" : item.char;
  if (item.logprob === null) {
    // The first character: the model has no start-of-text to predict it from, so it is context only.
    span.classList.add("context");
    span.title = `${describeChar(item.char)}: the first character, context for the rest (not scored)`;
    return span;
  }
  const bits = -item.logprob / Math.LN2;
  span.style.backgroundColor = surpriseColour(bits);
  span.dataset.bits = bits.toFixed(3);
  const guesses = topGuesses(item.top);
  const percent = (Math.exp(item.logprob) * 100).toFixed(2);
  span.title = `${describeChar(item.char)}: ${bits.toFixed(2)} bits (p = ${percent}%)`
    + (guesses.length ? `\n${whose} guesses: ${guesses.join(", ")}` : "");
  return span;
}

function showScore(result) {
  $("score-bpc").textContent = result.bits_per_char.toFixed(3);
  $("score-chars").textContent = result.chars.toLocaleString("en");
  $("score-model").textContent = madeBy(result);
  const spans = document.createDocumentFragment();
  for (const item of result.per_char) {
    const span = scoredChar(item, "the model's");
    // A newline keeps its visible mark, or its colour would have no width to show in.
    if (item.char === "\n") span.textContent = "↵\n";
    spans.append(span);
  }
  $("scored").replaceChildren(spans);
  $("score-summary").hidden = $("score-legend").hidden = false;
}

// Where one model gave a character at least twice the probability the other did (1 bit less; the
// note in index.html says so), its row is marked there.
const MUCH_LESS_BITS = 1;

// Which model (0 or 1) was much less surprised by character i; null for neither, and for the context
// character, which nobody scores.
function lessSurprised(results, i) {
  const bits = results.map((r) => (r.per_char[i].logprob === null ? null : -r.per_char[i].logprob / Math.LN2));
  if (bits[0] === null || Math.abs(bits[0] - bits[1]) < MUCH_LESS_BITS) return null;
  return bits[0] < bits[1] ? 0 : 1;
}

// The models' ids at the start of the rows, so the first line says which row is whose.
function rowNames(results) {
  const names = document.createElement("span");
  names.className = "row-names";
  for (const result of results) {
    const name = document.createElement("span");
    name.textContent = name.title = result.model;
    names.append(name);
  }
  return names;
}

// The text once, as columns of two cells (top: the first model, bottom: the second), so the rows stay
// aligned character by character however the lines wrap. Columns are grouped into words that wrap
// as a whole (a word wider than the box wraps inside itself), and a newline ends the line.
function comparedText(results) {
  const text = document.createDocumentFragment();
  text.append(rowNames(results));
  const wins = [0, 0];
  let word = null;
  results[0].per_char.forEach((item, i) => {
    const pair = document.createElement("span");
    pair.className = "pair";
    const cells = results.map((r) => scoredChar(r.per_char[i], `${r.model}'s`));
    const better = lessSurprised(results, i);
    if (better !== null) {
      cells[better].classList.add("better");
      wins[better] += 1;
    }
    cells.forEach((cell, row) => { cell.dataset.model = results[row].model; });
    pair.append(...cells);
    if (!word) {
      word = document.createElement("span");
      word.className = "word";
      text.append(word);
    }
    word.append(pair);
    if (item.char.trim() === "") word = null; // a word ends after its white space
    if (item.char === "\n") text.append("\n");
  });
  return { text, wins };
}

// One row of the comparison table: which row of the text it is, the model and version, its bpc.
function comparisonRow(result, row, wins) {
  const tr = document.createElement("tr");
  tr.dataset.model = result.model;
  const cells = [row, madeBy(result), result.bits_per_char.toFixed(3), `${wins.toLocaleString("en")} characters`];
  for (const [i, value] of cells.entries()) {
    const td = document.createElement(i === 0 ? "th" : "td");
    if (i === 0) td.scope = "row";
    if (i === 2) td.className = "bpc";
    td.textContent = value;
    tr.append(td);
  }
  return tr;
}

// Which model predicts the text better, by how much, in words.
function verdict(results) {
  const [a, b] = results;
  const chars = `Over ${a.chars.toLocaleString("en")} predicted characters`;
  const gap = Math.abs(a.bits_per_char - b.bits_per_char);
  if (gap.toFixed(3) === "0.000") return `${chars}, both models predict this text equally well.`;
  const [better, worse] = a.bits_per_char < b.bits_per_char ? [a, b] : [b, a];
  return `${chars}, ${better.model} predicts this text better: ${gap.toFixed(3)} fewer bits per character `
    + `than ${worse.model}.`;
}

function showComparison(results) {
  if (results[0].per_char.length !== results[1].per_char.length) {
    throw new UserError("The two models split the text into different characters; cannot compare them.");
  }
  const { text, wins } = comparedText(results);
  $("compare-rows").replaceChildren(
    comparisonRow(results[0], "top", wins[0]), comparisonRow(results[1], "bottom", wins[1]));
  $("compare-verdict").textContent = verdict(results);
  $("compared").replaceChildren(text);
  $("compare-summary").hidden = $("score-legend").hidden = false;
}

// Hide every result of the last scoring (single or compared).
function clearScore() {
  $("scored").replaceChildren();
  $("compared").replaceChildren();
  $("score-summary").hidden = $("compare-summary").hidden = $("score-legend").hidden = true;
}

// POST /score with one model; in a comparison, a refusal says which model refused.
async function scoreWith(model, text, named) {
  const body = { ...modelField(model), text, top_k: 5, per_char: true };
  const response = await api("/score", { method: "POST", headers: JSON_HEADERS, body: JSON.stringify(body) });
  if (!response.ok) {
    const message = await errorMessage(response);
    throw new UserError(named ? `${model}: ${message}` : message);
  }
  return response.json();
}

async function score(event) {
  event.preventDefault();
  $("score").disabled = true;
  showError("score-error", "");
  const text = $("score-text").value;
  const first = pickedModel();
  const second = $("compare-model").value || null;
  try {
    if (second && second !== first) {
      const results = await Promise.all([scoreWith(first, text, true), scoreWith(second, text, true)]);
      clearScore();
      showComparison(results);
    } else {
      const result = await scoreWith(first, text, false);
      clearScore();
      showScore(result);
    }
  } catch (err) {
    clearScore();
    showError("score-error", messageOf(err));
  } finally {
    $("score").disabled = false;
    refreshModels(); // either model may have been loaded for this
  }
}

// ---------------------------------------------------------------- models

// The picked model's id, or null before the list has loaded (requests then go to the default).
const pickedModel = () => $("model").value || null;

// `model` for a request body: named when one is picked, left out otherwise.
const modelField = (model) => (model ? { model } : {});

// "a 3f2c1e2a9b7d": the model and weights a response says made it.
const madeBy = (response) => [response.model, response.model_version].filter(Boolean).join(" ");

// 369000 -> "369k", 3477600 -> "3.5M".
function shortCount(n) {
  if (n < 1000) return String(n);
  if (n < 999500) return `${Math.round(n / 1000)}k`;
  return `${(n / 1e6).toFixed(1)}M`;
}

function statusText(model) {
  if (model.status === "loaded") return "loaded";
  if (model.status === "available") return "loads on first use";
  return `unavailable: ${model.error || "it does not load"}`;
}

// What an option says: "b · 369k parameters · 1.541 bpc · loads on first use".
function modelLabel(model) {
  return [
    model.default ? `${model.id} (default)` : model.id,
    model.parameters === null ? null : `${shortCount(model.parameters)} parameters`,
    model.bits_per_char === null ? null : `${model.bits_per_char.toFixed(3)} bpc`,
    statusText(model),
  ].filter(Boolean).join(" · ");
}

// Fill a picker with the models, keeping its choice if that model is still there and usable;
// `keep(model)` says whether an option may be chosen.
function fillPicker(select, first, keep) {
  const previous = select.value;
  const options = models.map((model) => {
    const option = new Option(modelLabel(model), model.id);
    option.title = option.textContent; // an error can be longer than the box is wide
    option.disabled = !keep(model);
    return option;
  });
  select.replaceChildren(...first, ...options);
  const still = options.find((o) => o.value === previous && !o.disabled);
  select.value = still ? previous : "";
}

// Both pickers: the model (the default at first, unavailable ones disabled) and the one to compare
// with (none, or any other usable model).
function showModels() {
  const picker = $("model");
  fillPicker(picker, [], (m) => m.status !== "unavailable");
  if (picker.value === "") {
    const usable = models.filter((m) => m.status !== "unavailable");
    picker.value = (usable.find((m) => m.default) || usable[0] || { id: "" }).id;
  }
  picker.disabled = models.length === 0;
  fillPicker($("compare-model"), [new Option("none", "")],
    (m) => m.status !== "unavailable" && m.id !== picker.value);
  showCard();
}

async function loadModels() {
  const response = await api("/v1/models");
  if (!response.ok) throw new UserError(await errorMessage(response));
  models = (await response.json()).data;
  showModels();
}

// After a request: a model may have been loaded (or another unloaded) for it. Nothing is said if
// this fails: the list shown stays as it was.
function refreshModels() {
  loadModels().catch(() => {});
}

// The header's card, for the picked model: its file, size, held-out bpc, and the device.
function showCard() {
  const id = pickedModel();
  const card = cards.get(id) || models.find((m) => m.id === id);
  if (!card) return;
  const bpc = card.bits_per_char;
  $("model-info").textContent = [
    card.checkpoint || card.id,
    card.parameters == null ? null : `${card.parameters.toLocaleString("en")} parameters`,
    bpc == null ? null : `${bpc.toFixed(3)} bits/char held out`,
    device,
  ].filter(Boolean).join(" · ");
}

// ---------------------------------------------------------------- tabs, model card, wiring

const tabs = () => Array.from(document.querySelectorAll('[role="tab"]'));

function selectTab(tab) {
  for (const each of tabs()) {
    const selected = each === tab;
    each.setAttribute("aria-selected", String(selected));
    each.tabIndex = selected ? 0 : -1; // one tab stop for the tab list; arrows move within it
    $(each.getAttribute("aria-controls")).hidden = !selected;
  }
}

function tabKeys(event) {
  const all = tabs();
  const moves = { ArrowRight: 1, ArrowLeft: -1, Home: -all.length, End: all.length };
  if (!(event.key in moves)) return;
  event.preventDefault();
  const index = Math.min(Math.max(all.indexOf(event.target) + moves[event.key], 0), all.length - 1);
  all[index].focus();
  selectTab(all[index]);
}

async function loadInfo() {
  const response = await api("/info");
  if (!response.ok) throw new UserError(await errorMessage(response));
  const info = await response.json();
  limits = info.limits;
  device = info.device;
  $("length").max = String(limits.max_length);
  cards = new Map((info.models || []).map((card) => [card.id, card]));
}

// The card and the model list, side by side; the page is ready once both are shown.
async function loadPage() {
  try {
    await Promise.all([loadInfo(), loadModels()]);
    showCard();
    document.body.dataset.ready = "true";
  } catch (err) {
    $("model-info").textContent = `The model card is unavailable. ${messageOf(err)}`;
  }
}

// A new model: its card in the header, and it can no longer be the one to compare with.
function modelPicked() {
  if ($("compare-model").value === pickedModel()) $("compare-model").value = "";
  showModels();
}

// Ctrl+Enter (⌘+Enter) in a text box submits its form.
function submitOnCtrlEnter(event) {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    event.target.form.requestSubmit();
  }
}

$("generate-form").addEventListener("submit", generate);
$("stop").addEventListener("click", stop);
$("copy-curl").addEventListener("click", copyCurl);
$("new-seed").addEventListener("click", newSeed);
$("scale-factor").addEventListener("input", scaleChanged);
$("temperature").addEventListener("input", temperatureChanged);
$("score-form").addEventListener("submit", score);
$("model").addEventListener("change", modelPicked);
$("constraint-kind").addEventListener("change", constraintKindChanged);
for (const box of ["seed", "score-text", "constraint-text"]) $(box).addEventListener("keydown", submitOnCtrlEnter);
for (const tab of tabs()) {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", tabKeys);
}
scaleChanged();
constraintKindChanged(); // a reload may keep the kind chosen
loadPage();
