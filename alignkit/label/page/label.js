// alignkit label: one prompt at a time; every change is posted (and stored) as it is made.
// Model text and labeller text are put in the page as text nodes only, never as HTML.
"use strict";

const token = document.querySelector('meta[name="alignkit-token"]').content;
const $ = (id) => document.getElementById(id);
let labeller = "";
let view = null; // {item, prompt, responses, state, status}
let tied = {}; // answer index -> tied with the answer above it (ties follow the answer when it moves)
let selected = null; // answer index
let queue = Promise.resolve(); // posts go out one after the other, in the order they were made
let typing = null; // timer of a text draft not yet posted

function say(text, ok) {
  const m = $("message");
  m.textContent = text || "";
  m.className = ok ? "ok" : "";
}

async function call(method, path, body) {
  const options = { method, headers: { "X-Alignkit-Token": token } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(data.error || `HTTP ${response.status}`);
  return data;
}

function post(path, body) {
  const sent = queue.then(() => call("POST", path, body));
  queue = sent.catch(() => {});
  return sent;
}

function state() {
  const order = view.state.order;
  return {
    order: order.slice(),
    ties: order.map((a, pos) => pos > 0 && !!tied[a]),
    thumbs: Object.assign({}, view.state.thumbs),
    none: $("none").checked,
    text: $("write").value,
    display: view.state.display,
  };
}

function counters(c) {
  if (!c) return;
  $("counter").textContent =
    `You: ${c.done} done, ${c.left} left` + (c.skipped ? `, ${c.skipped} skipped` : "") +
    ` · All: ${c.complete} of ${c.total} prompts done` + (c.min_labels > 1 ? ` (${c.min_labels} labellers each)` : "");
}

function save(kind) {
  if (!view) return Promise.resolve();
  const body = { labeller, item: view.item, kind, state: state() };
  view.state = body.state;
  return post("/api/action", body).then(
    (r) => { counters(r.counters); return r; },
    (e) => { say(`Not saved: ${e.message}`); throw e; },
  );
}

function flushText() {
  if (typing) {
    clearTimeout(typing);
    typing = null;
    return save("edit");
  }
  return Promise.resolve();
}

function show(v) {
  view = v;
  selected = null;
  $("history").hidden = true;
  $("history-toggle").setAttribute("aria-expanded", "false");
  if (!v) {
    $("task").hidden = true;
    $("finished").hidden = false;
    return;
  }
  $("finished").hidden = true;
  $("task").hidden = false;
  tied = {};
  v.state.order.forEach((a, pos) => { if (v.state.ties[pos]) tied[a] = true; });
  $("none").checked = !!v.state.none;
  $("write").value = v.state.text || "";
  const conversation = $("conversation");
  conversation.replaceChildren();
  const turns = typeof v.prompt === "string" ? [{ role: "user", content: v.prompt }] : v.prompt;
  for (const turn of turns) {
    const div = document.createElement("div");
    div.className = "message";
    const role = document.createElement("span");
    role.className = "role";
    role.textContent = turn.role;
    div.append(role, document.createTextNode(turn.content));
    conversation.append(div);
  }
  render();
  const first = $("answers").firstElementChild;
  if (first) first.focus();
}

function render() {
  const list = $("answers");
  list.replaceChildren();
  let rank = 0;
  view.state.order.forEach((answer, pos) => {
    const isTied = pos > 0 && !!tied[answer];
    if (!isTied) rank = pos + 1;
    const li = document.createElement("li");
    li.className = "answer" + (isTied ? " tied" : "") + (answer === selected ? " selected" : "");
    li.tabIndex = 0;
    li.dataset.answer = String(answer);
    li.dataset.key = String(view.state.display.indexOf(answer) + 1);
    li.setAttribute("aria-label", `rank ${rank}${isTied ? " (tie)" : ""}, answer ${li.dataset.key}`);
    const handle = document.createElement("span");
    handle.className = "rank";
    handle.textContent = isTied ? `=${rank}` : String(rank);
    const key = document.createElement("span");
    key.className = "key";
    key.textContent = `[${li.dataset.key}]`;
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = view.responses[answer];
    const tools = document.createElement("span");
    tools.className = "tools";
    const thumb = view.state.thumbs[String(answer)];
    tools.append(
      button("tie", "Tie with the answer above (t)", "= tie", isTied, () => toggleTie(answer), pos === 0),
      button("up", "Thumbs up (+)", "+1", thumb === 1, () => setThumb(answer, 1)),
      button("down", "Thumbs down (-)", "-1", thumb === -1, () => setThumb(answer, -1)),
    );
    li.append(handle, key, text, tools);
    li.addEventListener("focus", () => select(answer, false));
    li.addEventListener("pointerdown", (e) => startDrag(e, li, answer));
    list.append(li);
  });
}

function button(cls, title, label, pressed, onClick, disabled) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.title = title;
  b.textContent = label;
  b.setAttribute("aria-pressed", pressed ? "true" : "false");
  b.disabled = !!disabled;
  b.tabIndex = -1; // the keyboard has its own keys for these; Tab goes answer to answer
  b.addEventListener("pointerdown", (e) => e.stopPropagation());
  b.addEventListener("click", (e) => { e.stopPropagation(); onClick(); });
  return b;
}

function cardOf(answer) {
  return $("answers").querySelector(`[data-answer="${answer}"]`);
}

function select(answer, focus = true) {
  selected = answer;
  for (const li of $("answers").children) li.classList.toggle("selected", li.dataset.answer === String(answer));
  if (focus) { const card = cardOf(answer); if (card) card.focus(); }
}

function change() {
  render();
  if (selected !== null) select(selected);
  save("edit").catch(() => {});
}

function move(answer, to) {
  const order = view.state.order;
  const from = order.indexOf(answer);
  to = Math.max(0, Math.min(order.length - 1, to));
  if (from === to) return;
  order.splice(from, 1);
  order.splice(to, 0, answer);
  delete tied[answer]; // a moved answer is judged anew
  delete tied[order[0]]; // and the first has nothing above to be tied with: no tie comes back when one moves above it
  selected = answer;
  change();
}

function toggleTie(answer) {
  if (view.state.order.indexOf(answer) === 0) return;
  tied[answer] = !tied[answer];
  selected = answer;
  change();
}

function setThumb(answer, value) {
  const thumbs = view.state.thumbs;
  if (thumbs[String(answer)] === value) delete thumbs[String(answer)];
  else thumbs[String(answer)] = value;
  selected = answer;
  change();
}

// dragging with pointer events: press on an answer, move, release over another to take its place
let drag = null;
function startDrag(e, li, answer) {
  if (e.button !== 0 || e.target.closest("button")) return;
  select(answer, false);
  drag = { answer, li, y: e.clientY, target: null };
  li.setPointerCapture(e.pointerId);
  li.classList.add("dragging");
  li.addEventListener("pointermove", onDrag);
  li.addEventListener("pointerup", endDrag, { once: true });
  li.addEventListener("pointercancel", endDrag, { once: true });
}

function onDrag(e) {
  if (!drag) return;
  let target = null;
  for (const card of $("answers").children) {
    const r = card.getBoundingClientRect();
    card.classList.remove("drop-before", "drop-after");
    if (e.clientY >= r.top && e.clientY <= r.bottom && card !== drag.li) target = card;
  }
  drag.target = target;
  if (target) target.classList.add(e.clientY > drag.y ? "drop-after" : "drop-before");
}

function endDrag(e) {
  if (!drag) return;
  const { answer, li, target } = drag;
  li.removeEventListener("pointermove", onDrag);
  drag = null;
  for (const card of $("answers").children) card.classList.remove("dragging", "drop-before", "drop-after");
  if (target && e.type === "pointerup") move(answer, view.state.order.indexOf(Number(target.dataset.answer)));
  else select(answer);
}

async function next(item) {
  await flushText().catch(() => {});
  const query = `labeller=${encodeURIComponent(labeller)}` + (item === undefined ? "" : `&item=${item}`);
  const r = await call("GET", `/api/next?${query}`);
  counters(r.counters);
  show(r.view);
}

// leave the prompt (submitted, or skipped with its draft kept) and take the next
async function leave(kind, done, failed) {
  if (!view) return;
  try {
    await flushText();
    await save(kind);
  } catch (e) {
    say(`${failed}: ${e.message}`);
    return;
  }
  say(done, true);
  try {
    await next();
  } catch (e) {  // stored all the same: say so, not that it failed
    say(`${done} The next prompt did not load (${e.message}): reload the page.`);
  }
}

const submit = () => leave("submit", "Submitted.", "Not submitted");
const skip = () => leave("skip", "Skipped: your draft is kept (h opens it again).", "Not skipped");

async function undo() {
  try {
    await flushText();
    const r = await post("/api/undo", { labeller });
    counters(r.counters);
    if (!r.view) { say("Nothing to undo."); return; }
    say(`Undone: your last ${r.view.undid}.`, true);
    show(r.view);
  } catch (e) {
    say(`Not undone: ${e.message}`);
  }
}

async function toggleHistory() {
  const panel = $("history");
  if (!panel.hidden) { panel.hidden = true; $("history-toggle").setAttribute("aria-expanded", "false"); return; }
  const r = await call("GET", `/api/history?labeller=${encodeURIComponent(labeller)}`);
  const list = $("history-list");
  list.replaceChildren();
  for (const h of r.items) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.item = String(h.item);
    b.textContent = `Prompt ${h.item + 1} (line ${h.line}): ${h.status}`;
    b.addEventListener("click", () => next(h.item).catch((e) => say(e.message)));
    li.append(b);
    list.append(li);
  }
  panel.hidden = false;
  $("history-toggle").setAttribute("aria-expanded", "true");
  const first = list.querySelector("button");
  if (first) first.focus();
}

function toggleGuidelines() {
  const panel = $("guidelines");
  panel.hidden = !panel.hidden;
  $("guide-toggle").setAttribute("aria-expanded", String(!panel.hidden));
}

document.addEventListener("keydown", (e) => {
  const typingIn = e.target.closest && e.target.closest("textarea, input");
  if (typingIn) {
    if (e.key === "Escape") { e.target.blur(); e.preventDefault(); }
    else if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && e.target.id === "write") { e.preventDefault(); submit(); }
    return;
  }
  if (e.ctrlKey || e.metaKey || e.altKey || !labeller) return;
  const key = e.key;
  if (key === "g") { toggleGuidelines(); return; }
  if (key === "h") { toggleHistory().catch((err) => say(err.message)); return; }
  if (key === "z") { e.preventDefault(); undo(); return; }
  if (!view || $("task").hidden) return;
  if (/^[1-9]$/.test(key)) {
    const answer = view.state.display[Number(key) - 1];
    if (answer !== undefined) select(answer);
  } else if (key === "ArrowUp" || key === "ArrowDown") {
    e.preventDefault();
    if (selected === null) { select(view.state.order[0]); return; }
    move(selected, view.state.order.indexOf(selected) + (key === "ArrowUp" ? -1 : 1));
  } else if (key === "t" && selected !== null) toggleTie(selected);
  else if ((key === "+" || key === "=") && selected !== null) setThumb(selected, 1);
  else if (key === "-" && selected !== null) setThumb(selected, -1);
  else if (key === "n") { $("none").checked = !$("none").checked; change(); }
  else if (key === "w" || key === "e") {
    e.preventDefault();
    if (key === "e" && selected !== null) { $("write").value = view.responses[selected]; scheduleText(); }
    $("write").focus();
  } else if (key === "s") skip();
  else if (key === "Enter" && !(e.target.closest && e.target.closest("button, a"))) { e.preventDefault(); submit(); }
});

function scheduleText() {
  if (typing) clearTimeout(typing);
  typing = setTimeout(() => { typing = null; save("edit").catch(() => {}); }, 400);
}

$("write").addEventListener("input", scheduleText);
$("write").addEventListener("blur", () => flushText().catch(() => {}));
$("none").addEventListener("change", change);
$("submit").addEventListener("click", submit);
$("skip").addEventListener("click", skip);
$("undo").addEventListener("click", undo);
$("guide-toggle").addEventListener("click", toggleGuidelines);
$("history-toggle").addEventListener("click", () => toggleHistory().catch((e) => say(e.message)));
window.addEventListener("pagehide", () => { if (typing) flushText(); });

// others' work moves the overall counter: look every few seconds (a read, nothing stored)
const POLL_MS = 5000;
setInterval(() => {
  if (!labeller || document.hidden) return;
  call("GET", `/api/counters?labeller=${encodeURIComponent(labeller)}`).then((r) => counters(r.counters), () => {});
}, POLL_MS);

function start(name) {
  labeller = name.trim();
  const url = new URL(location.href);
  url.searchParams.set("labeller", labeller);
  url.searchParams.delete("token"); // the token lives in a cookie from here on
  history.replaceState(null, "", url);
  $("name").value = labeller;
  document.title = `alignkit label: ${labeller}`;
  next().catch((e) => say(e.message));
}

$("who").addEventListener("submit", (e) => {
  e.preventDefault();
  if ($("name").value.trim()) start($("name").value);
});

const given = new URL(location.href).searchParams.get("labeller") ||
  document.querySelector('meta[name="alignkit-labeller"]').content;
if (given) start(given);
else $("name").focus();
