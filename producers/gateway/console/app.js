// The console: plain browser JavaScript against the gateway's own API, no build step.
// The API key lives in localStorage and goes in the Authorization header of every call; the event stream
// is read with fetch (EventSource cannot send headers) and resumed with Last-Event-ID when it drops.
"use strict";

const $ = (id) => document.getElementById(id);
let apiKey = localStorage.getItem("aigc.key") || "";
let nextCursor = null;

function headers(extra) {
  return Object.assign({ Authorization: "Bearer " + apiKey }, extra || {});
}

async function api(path, options) {
  const resp = await fetch(path, Object.assign({}, options, { headers: headers((options || {}).headers) }));
  const body = resp.headers.get("content-type")?.includes("json") ? await resp.json() : await resp.text();
  if (!resp.ok) {
    const err = new Error(body.detail || body.title || String(body));
    err.problem = body;
    throw err;
  }
  return body;
}

function showError(err) {
  $("error").textContent = err ? (err.problem && err.problem.field ? err.problem.field + ": " : "") + err.message : "";
}

async function useKey(event) {
  if (event) event.preventDefault();
  apiKey = $("api-key").value.trim() || apiKey;
  localStorage.setItem("aigc.key", apiKey);
  try {
    const me = await api("/v1/whoami");
    $("whoami").textContent = "tenant " + me.tenant_id + (me.operator ? " (operator)" : "");
    $("ops-section").hidden = !me.operator;
    showError(null);
    await loadGallery(true);
    if (me.operator) await loadOps();
  } catch (err) {
    $("whoami").textContent = "";
    showError(err);
  }
}

async function submit(event) {
  event.preventDefault();
  showError(null);
  const size = Number($("size").value);
  const frames = Number($("frames").value);
  const body = { prompt: $("prompt").value, width: size, height: size, steps: Number($("steps").value) };
  if (frames > 0) body.video = { num_frames: frames, fps: 8 };
  try {
    const accepted = await api("/v1/generations", {
      method: "POST",
      body: JSON.stringify(body),
      headers: { "Content-Type": "application/json" },
    });
    const total = (frames > 0 ? frames : 1) * body.steps;
    follow(accepted.id, total);
  } catch (err) {
    showError(err);
  }
}

function setProgress(state, done, total) {
  $("state").textContent = state;
  $("progress").max = Math.max(total, 1);
  $("progress").value = Math.min(done, total);
  $("steps-done").textContent = done + " / " + total + " steps";
}

// Server-Sent Events over fetch: parse "id:", "event:" and "data:" lines; reconnect from the last id.
async function follow(id, total) {
  $("job").hidden = false;
  $("job-id").textContent = id;
  $("result").textContent = "";
  setProgress("SUBMITTED", 0, total);
  let lastId = null;
  for (let attempt = 0; attempt < 30; attempt++) {
    try {
      const resp = await fetch("/v1/generations/" + id + "/events",
        { headers: headers(lastId ? { "Last-Event-ID": lastId } : {}) });
      if (!resp.ok) throw new Error("events: HTTP " + resp.status);
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const event = { id: null, event: "message", data: "" };
          for (const line of block.split("\n")) {
            if (line.startsWith("id: ")) event.id = line.slice(4);
            else if (line.startsWith("event: ")) event.event = line.slice(7);
            else if (line.startsWith("data: ")) event.data += line.slice(6);
          }
          if (event.id) lastId = event.id;
          if (event.event === "status") {
            const s = JSON.parse(event.data);
            const t = s.request_total || total;
            total = t;
            setProgress(s.state, s.state === "ASSEMBLING" ? t : s.done, t);
          } else if (event.event === "completion") {
            const c = JSON.parse(event.data);
            setProgress(c.status, c.status === "SUCCEEDED" ? total : Number($("progress").value), total);
            if (c.message) $("result").textContent = c.reason_code + ": " + c.message;
            await loadGallery(true);
            return;
          }
        }
      }
    } catch (err) {
      showError(err);
    }
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function figure(item) {
  const fig = document.createElement("figure");
  fig.dataset.id = item.id;
  for (const out of item.outputs || []) {
    let media;
    if (out.kind === "VIDEO") {
      media = document.createElement("video");
      media.controls = true;
      media.loop = true;
      media.muted = true;
      media.src = out.url;
    } else {
      media = document.createElement("img");
      media.alt = item.id;
      media.src = out.url;
    }
    fig.appendChild(media);
  }
  const caption = document.createElement("figcaption");
  caption.textContent = item.state + " - " + (item.kind || "").toLowerCase() + " - " + (item.created_at || "").slice(0, 19);
  fig.appendChild(caption);
  return fig;
}

async function loadGallery(reset) {
  if (!apiKey) return;
  const path = "/v1/generations?limit=12" + (reset || !nextCursor ? "" : "&cursor=" + encodeURIComponent(nextCursor));
  const page = await api(path);
  if (reset) $("gallery-items").textContent = "";
  for (const item of page.items) $("gallery-items").appendChild(figure(item));
  nextCursor = page.next_cursor;
  $("more").hidden = !nextCursor;
}

function rows(tbody, cells) {
  tbody.textContent = "";
  for (const row of cells) {
    const tr = document.createElement("tr");
    for (const cell of row) {
      const td = document.createElement("td");
      td.textContent = cell;
      tr.appendChild(td);
    }
    tbody.appendChild(tr);
  }
}

async function loadOps() {
  const o = await api("/v1/ops/overview");
  const n = (v) => (v === undefined || v === null ? "-" : String(Math.round(v)));
  rows($("ops-classes").tBodies[0], Object.entries(o.classes).sort().map(([cls, v]) =>
    [cls, n(v.lag_messages), n(v.backlog_messages),
     v.queue_wait_p99_s === undefined || Number.isNaN(v.queue_wait_p99_s) ? "-" : v.queue_wait_p99_s.toFixed(3)]));
  $("ops-prom").textContent = (o.metrics.error ? o.metrics.error + "; " : "") + "from " + o.metrics.source;
  rows($("ops-stages").tBodies[0], o.stages.map((s) => [s.stage, s.ready ? "ready" : "NOT READY", (s.unmet || []).join(", ")]));
  $("ops-dlq-total").textContent = "(" + o.dead_letters.total + ")";
  rows($("ops-dlq").tBodies[0], o.dead_letters.by_stage_reason.map((d) => [d.stage, d.kind, d.code, d.count]));
}

async function replayDryRun() {
  try {
    const r = await api("/v1/ops/dlq/replay-dry-run", { method: "POST" });
    $("ops-replay-out").textContent = r.summary;
  } catch (err) {
    $("ops-replay-out").textContent = err.message;
  }
}

$("key-form").addEventListener("submit", useKey);
$("submit-form").addEventListener("submit", submit);
$("more").addEventListener("click", () => loadGallery(false));
$("ops-refresh").addEventListener("click", loadOps);
$("ops-replay").addEventListener("click", replayDryRun);
if (location.hash.startsWith("#key=")) {
  // `aigc demo` prints the console's URL with a key in the fragment: keep it, then take it off the URL.
  apiKey = decodeURIComponent(location.hash.slice(5));
  history.replaceState(null, "", location.pathname);
}
if (apiKey) {
  $("api-key").value = apiKey;
  useKey();
}
