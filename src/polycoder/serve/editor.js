// The playground's editor (served by polycoder.serve.playground at /playground/editor.js).
//
// A transparent <textarea> over a <pre>: the textarea keeps the caret, the selection, undo and
// input methods; the <pre> paints the code coloured by the server's Pygments
// (/playground/highlight) and, at the caret, the model's completion as grey "ghost text" that
// is not part of the text until Tab accepts it.
//
// Completion, as editors ask for it: the text before the caret is `prompt`, the text after it
// `suffix` (fill-in-the-middle), streamed from /v1/completions. Each edit aborts the request in
// flight (AbortController: the server frees its row at once, and its prompt cache keeps what
// the next request shares) and asks again after a pause in typing (DEBOUNCE_MS). A model
// without FIM tokens answers 400 for `suffix`: from then on the page sends the prefix alone
// and says so once, beside the status line (as it does when the server itself falls back to
// the prefix, `--suffix-fallback prefix-only`, which it says in an X-Polycoder-Warning header).
//
// window.playgroundStats counts requests and aborts, for the tests (tests/test_serve_playground.py).
"use strict";

const DEBOUNCE_MS = 200;
const HIGHLIGHT_DEBOUNCE_MS = 60;
const MAX_HIGHLIGHT_CHARS = 200000;  // the server's limit (playground.MAX_HIGHLIGHT_CHARS)
const MIN_BUDGET = 256;    // characters around the caret below which a too-long prompt is the user's to fix

const $ = (id) => document.getElementById(id);
const code = $("code"), view = $("highlight"), editorBox = $("editor");
const NEEDS_KEY = document.body.dataset.needsKey === "true";
if (NEEDS_KEY) $("key_label").hidden = false;

const stats = { requests: 0, aborted: 0, lastBody: null };
window.playgroundStats = stats;

let ghost = null;          // {at: caret offset, text} while a suggestion is shown
let inFlight = null;       // the AbortController of the completion request in flight
let completeTimer = null;
let colours = { text: "", tokens: [] };  // the last highlight answer and the text it was for
let highlightController = null, highlightTimer = null;
let lastValue = code.value;
let budget = 16000;       // characters of code sent around the caret (see around)
let sendSuffix = true;     // false once the server refused `suffix` (a model without FIM tokens)
let escaped = false;       // Esc with nothing to dismiss: the next Tab leaves the editor

// ---- painting ----------------------------------------------------------------------------------

function commonPrefixLength(a, b) {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  return i;
}

// The <pre>: the text, coloured as far as the last highlight answer still describes it (up to the
// first character that changed since), then plain; the ghost span at its caret offset.
function render() {
  const text = code.value;
  const pieces = [];
  const same = commonPrefixLength(text, colours.text);
  let pos = 0;
  for (const [cls, t] of colours.tokens) {
    if (pos >= same) break;
    const take = t.slice(0, same - pos);
    pieces.push([cls, take]);
    pos += take.length;
  }
  if (pos < text.length) pieces.push(["", text.slice(pos)]);

  const out = document.createDocumentFragment();
  const add = (cls, t) => {
    if (!t) return;
    if (!cls) { out.appendChild(document.createTextNode(t)); return; }
    const span = document.createElement("span");
    span.className = cls;
    span.textContent = t;
    out.appendChild(span);
  };
  const addGhost = () => {
    const span = document.createElement("span");
    span.id = "ghost";
    span.textContent = ghost.text;
    out.appendChild(span);
  };
  let placed = !ghost;
  pos = 0;
  for (const [cls, t] of pieces) {
    if (!placed && ghost.at <= pos + t.length) {
      const k = ghost.at - pos;
      add(cls, t.slice(0, k));
      addGhost();
      placed = true;
      add(cls, t.slice(k));
    } else {
      add(cls, t);
    }
    pos += t.length;
  }
  if (!placed) addGhost();
  add("", "\n");  // so that a trailing newline's empty last line exists here too
  view.replaceChildren(out);
  syncScroll();
}

function syncScroll() {
  view.scrollTop = code.scrollTop;
  view.scrollLeft = code.scrollLeft;
}

function scheduleHighlight() {
  clearTimeout(highlightTimer);
  highlightTimer = setTimeout(highlight, HIGHLIGHT_DEBOUNCE_MS);
}

async function highlight() {
  const text = code.value, language = $("language").value;
  if (highlightController) highlightController.abort();
  if (language === "text" || text.length > MAX_HIGHLIGHT_CHARS) {
    colours = { text, tokens: [["", text]] };
    render();
    return;
  }
  const controller = highlightController = new AbortController();
  try {
    const response = await fetch("/playground/highlight", {
      method: "POST", headers: headers(), body: JSON.stringify({ code: text, language }), signal: controller.signal });
    if (!response.ok) return;  // no key yet, or too long: the text stays plain
    const answer = await response.json();
    colours = { text, tokens: answer.tokens };
    render();
  } catch (e) {
    if (e.name !== "AbortError") console.warn("highlighting failed:", e);
  } finally {
    if (highlightController === controller) highlightController = null;
  }
}

// ---- completion --------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  if (NEEDS_KEY) h["Authorization"] = "Bearer " + $("api_key").value;
  return h;
}

function requestBody(prefix, suffix) {
  const body = {
    model: $("model").textContent, prompt: prefix, stream: true,
    max_tokens: parseInt($("max_tokens").value, 10),
    temperature: parseFloat($("temperature").value), top_p: parseFloat($("top_p").value),
  };
  if (sendSuffix && suffix) body.suffix = suffix;
  if ($("seed").value !== "") body.seed = parseInt($("seed").value, 10);
  const stop = $("stop").value.split(",").map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t")).filter((s) => s);
  if (stop.length) body.stop = stop;
  return body;
}

function setState(state, message) {
  editorBox.dataset.state = state;
  $("status").textContent = message;
  $("status").classList.toggle("error", state === "error");
  const busy = state === "waiting" || state === "streaming";
  $("cancel").disabled = !busy;
}

async function errorMessage(response) {
  const err = await response.json().catch(() => ({}));
  return { message: (err.error && err.error.message) || response.statusText || `HTTP ${response.status}`,
           param: err.error && err.error.param, code: err.error && err.error.code };
}

// The code sent around the caret: up to 3/4 of `budget` characters before it and 1/4 after it,
// cut at line boundaries. The start before the caret moves in steps of a quarter of its share,
// not with every key, so that the prompt's start (and the server's prompt cache) stays the same
// while the user types. `budget` halves when the server finds the prompt too long for its context.
function around(text, at) {
  const before = Math.floor(budget * 3 / 4), after = budget - before;
  let from = 0;
  if (at > before) {
    const step = Math.max(1, Math.floor(before / 4));
    from = Math.ceil((at - before) / step) * step;
    const newline = text.indexOf("\n", from - 1);
    if (newline >= 0 && newline < at) from = newline + 1;
  }
  let to = Math.min(text.length, at + after);
  if (to < text.length) {
    const newline = text.lastIndexOf("\n", to);
    if (newline > at) to = newline;
  }
  return [text.slice(from, at), text.slice(at, to)];
}

function abortCompletion() {
  clearTimeout(completeTimer);
  if (inFlight) {
    inFlight.abort();
    stats.aborted += 1;
    inFlight = null;
  }
}

function dismiss() {
  abortCompletion();
  if (ghost) { ghost = null; render(); }
}

function scheduleCompletion() {
  abortCompletion();
  if (!$("auto").checked) return;
  setState("pending", "");
  completeTimer = setTimeout(complete, DEBOUNCE_MS);
}

// Ask for the completion at the caret and stream it into the ghost text. The suggestion shown
// so far stays until the new one's first piece arrives (no flicker while typing through it).
async function complete() {
  abortCompletion();
  const at = code.selectionStart, text = code.value;
  if (at !== code.selectionEnd) { setState("idle", "no completion over a selection"); return; }
  if (NEEDS_KEY && !$("api_key").value) { setState("error", "enter the API key to get completions"); return; }
  const controller = inFlight = new AbortController();
  stats.requests += 1;
  setState("waiting", "asking…");
  const t0 = performance.now();
  let pieces = 0, finish = null, started = false;
  try {
    let response;
    for (;;) {  // at most a few tries: each changes what is sent, or gives up
      const body = requestBody(...around(text, at));
      stats.lastBody = body;
      response = await post(body, controller.signal);
      if (response.ok) break;
      const err = await errorMessage(response);
      if (response.status === 400 && err.param === "suffix" && "suffix" in body) {
        sendSuffix = false;  // the model has no FIM tokens: the text before the caret alone from now on
        note("prefix only: this model cannot fill in the middle, so the text after the caret is not sent");
      } else if (response.status === 400 && err.code === "context_length_exceeded" && err.param !== "max_tokens"
                 && budget > MIN_BUDGET) {
        budget = Math.floor(budget / 2);  // kept for the next requests too
      } else {
        throw new Error(err.message);
      }
    }
    // A server started with --suffix-fallback prefix-only completes the prefix alone and says so here.
    const warning = response.headers.get("X-Polycoder-Warning");
    if (warning) note(warning);
    for await (const chunk of events(response)) {
      // Aborted by an edit: pieces already read may still come out of the buffer, and the
      // newer request owns the ghost text and the state from now on.
      if (controller.signal.aborted) return;
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        if (choice.text) {
          if (!started) { ghost = { at, text: "" }; started = true; setState("streaming", "streaming…"); }
          ghost.text += choice.text;
          pieces += 1;
          render();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    if (!started && ghost) { ghost = null; render(); }  // an empty completion replaces the old one too
    const seconds = (performance.now() - t0) / 1000;
    setState("done", `done (${finish}), ${pieces} pieces in ${seconds.toFixed(2)} s`);
  } catch (e) {
    if (e.name !== "AbortError" && !controller.signal.aborted) setState("error", "error: " + e.message);
  } finally {
    if (inFlight === controller) inFlight = null;
  }
}

// Said once, beside the status line, and left there.
function note(text) {
  if (!$("mode").textContent) $("mode").textContent = text;
}

function post(body, signal) {
  return fetch("/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
}

// The JSON objects of a Server-Sent Events stream, up to `data: [DONE]`.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// ---- editing -----------------------------------------------------------------------------------

function indentUnit() {
  const v = $("indent").value;
  return v === "tab" ? "\t" : " ".repeat(parseInt(v, 10));
}

// Replace [start, end) with `text` as a user edit (so that Ctrl-Z undoes it) and select [selStart, selEnd).
function edit(start, end, text, selStart, selEnd) {
  code.focus();
  code.setSelectionRange(start, end);
  if (!document.execCommand("insertText", false, text)) {  // execCommand keeps the undo history
    code.setRangeText(text, start, end, "end");
    code.dispatchEvent(new Event("input"));
  }
  code.setSelectionRange(selStart, selEnd);
}

function lineStart(pos) { return code.value.lastIndexOf("\n", pos - 1) + 1; }

function lineEnd(pos) {
  const i = code.value.indexOf("\n", pos);
  return i < 0 ? code.value.length : i;
}

function accept() {
  const { at, text } = ghost;
  abortCompletion();  // what has streamed so far is what is taken
  edit(at, at, text, at + text.length, at + text.length);
}

function indent() {
  const { selectionStart: s, selectionEnd: e, value } = code;
  const unit = indentUnit();
  if (!value.slice(s, e).includes("\n")) {  // at the caret: to the next indentation stop
    const column = s - lineStart(s);
    const add = unit === "\t" ? "\t" : " ".repeat(unit.length - (column % unit.length));
    edit(s, e, add, s + add.length, s + add.length);
    return;
  }
  const from = lineStart(s), to = lineEnd(e);
  const lines = value.slice(from, to).split("\n");
  const block = lines.map((l) => (l ? unit + l : l)).join("\n");
  edit(from, to, block, s + (lines[0] ? unit.length : 0), e + block.length - (to - from));
}

function dedent() {
  const { selectionStart: s, selectionEnd: e, value } = code;
  const width = indentUnit() === "\t" ? 4 : indentUnit().length;
  const from = lineStart(s), to = lineEnd(e);
  const lines = value.slice(from, to).split("\n");
  const removed = lines.map((l) => (l.startsWith("\t") ? 1 : l.match(new RegExp(`^ {0,${width}}`))[0].length));
  const block = lines.map((l, i) => l.slice(removed[i])).join("\n");
  if (block.length === to - from) return;
  const first = Math.max(from, s - removed[0]);
  edit(from, to, block, first, Math.max(first, e - (to - from - block.length)));
}

function newline() {
  const s = code.selectionStart;
  const indentation = code.value.slice(lineStart(s), s).match(/^[ \t]*/)[0];
  const text = "\n" + indentation;
  edit(s, code.selectionEnd, text, s + text.length, s + text.length);
}

// ---- events ------------------------------------------------------------------------------------

code.addEventListener("keydown", (e) => {
  const plain = !e.ctrlKey && !e.altKey && !e.metaKey;
  if (e.key === "Tab" && plain) {
    if (escaped) { escaped = false; return; }  // let the browser move the focus on
    e.preventDefault();
    if (e.shiftKey) dedent();
    else if (ghost && ghost.text) accept();
    else indent();
    return;
  }
  escaped = false;
  if (e.key === "Escape") {
    if (ghost || inFlight || editorBox.dataset.state === "pending") {
      e.preventDefault();
      dismiss();
      setState("idle", "dismissed");
    } else {
      escaped = true;
    }
  } else if (e.key === "Enter" && plain && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    newline();
  } else if ((e.key === " " && e.ctrlKey) || (e.key === "Enter" && (e.ctrlKey || e.metaKey))) {
    e.preventDefault();
    complete();
  }
});

code.addEventListener("input", () => {
  const value = code.value, caret = code.selectionStart;
  // Typed the suggestion's next characters: keep the rest of it shown while the new one is asked for.
  if (ghost && caret > ghost.at && value.length - lastValue.length === caret - ghost.at
      && value.slice(0, ghost.at) === lastValue.slice(0, ghost.at) && value.slice(caret) === lastValue.slice(ghost.at)
      && ghost.text.startsWith(value.slice(ghost.at, caret))) {
    ghost = { at: caret, text: ghost.text.slice(caret - ghost.at) };
    if (!ghost.text) ghost = null;
  } else {
    ghost = null;
  }
  lastValue = value;
  render();
  scheduleHighlight();
  scheduleCompletion();
});

// The caret moved away from the suggestion (click, arrows, Home, ...): it no longer applies.
function caretMoved() {
  if (ghost && (code.selectionStart !== ghost.at || code.selectionEnd !== ghost.at)) {
    dismiss();
    setState("idle", "");
  }
}
code.addEventListener("keyup", caretMoved);
code.addEventListener("mouseup", caretMoved);
code.addEventListener("scroll", syncScroll);
$("language").addEventListener("change", highlight);
$("run").addEventListener("click", () => { code.focus(); complete(); });
$("cancel").addEventListener("click", () => { dismiss(); setState("idle", "stopped"); });

code.setSelectionRange(code.value.length, code.value.length);
render();
highlight();
