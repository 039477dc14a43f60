// The motif-video web UI: a client of the server's own /v1 API (same origin; with an API key the login cookie
// authorises these requests). Nothing is fetched from anywhere else.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, current: null, galleryLimit: 24, timer: null };

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = (response.headers.get("content-type") || "").includes("json") ? await response.json() : null;
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `${response.status} ${response.statusText}`;
    throw new Error(message);
  }
  return body;
}

function option(select, value, label, selected) {
  const o = document.createElement("option");
  o.value = value; o.textContent = label; o.selected = !!selected;
  select.appendChild(o);
}

function roundTo(value, multiple) { return Math.max(multiple, Math.round(value / multiple) * multiple); }

function sizePresets(model) {
  const [w, h] = model.defaults.size.split("x").map(Number);
  const m = model.size_multiple;
  const sizes = [[w, h], [h, w], [roundTo(Math.sqrt(w * h), m), roundTo(Math.sqrt(w * h), m)],
                 [roundTo(w / 2, m), roundTo(h / 2, m)], [roundTo(w * 1.5, m), roundTo(h * 1.5, m)]];
  const seen = new Set();
  return sizes.filter(([a, b]) => { const k = `${a}x${b}`; if (seen.has(k)) return false; seen.add(k); return true; });
}

function framePresets(model) {
  const t = Number(model.frames_rule.split("k")[0]);
  const n = model.defaults.num_frames;
  const k = (n - 1) / t;
  const counts = [1, t * Math.max(1, Math.round(k / 2)) + 1, n, t * 2 * k + 1];
  return [...new Set(counts)].sort((a, b) => a - b);
}

async function loadModel() {
  const models = await api("/v1/models");
  const model = models.data[0];
  state.model = model;
  $("model-name").textContent = `${model.id} · ${model.device}`;
  const d = model.defaults;
  for (const [w, h] of sizePresets(model)) {
    option($("size"), `${w}x${h}`, `${w} × ${h}${`${w}x${h}` === d.size ? " (default)" : ""}`, `${w}x${h}` === d.size);
  }
  for (const n of framePresets(model)) {
    const label = n === 1 ? "1 frame (image)" : `${n} frames, ${(n / model.defaults.fps).toFixed(1)} s`;
    option($("frames"), n, label, n === d.num_frames);
  }
  $("steps").value = d.num_inference_steps;
  $("guidance").value = d.guidance_scale;
  $("negative-prompt").value = d.negative_prompt;
}

async function loadLoras() {
  const loras = await api("/v1/loras");
  const box = $("lora-list");
  if (!loras.available) { box.textContent = "LoRA loading is unavailable in this build"; return; }
  if (!loras.data.length) { box.textContent = "none in --lora-dir"; return; }
  box.textContent = "";
  box.classList.remove("muted");
  for (const { name } of loras.data) {
    const row = document.createElement("div");
    row.className = "lora";
    row.innerHTML = `<input type="checkbox"><span></span><input type="number" step="0.05" value="1" title="scale">`;
    row.querySelector("span").textContent = name;
    row.dataset.name = name;
    box.appendChild(row);
  }
}

function selectedLoras() {
  return [...document.querySelectorAll("#lora-list .lora")]
    .filter((row) => row.querySelector("input[type=checkbox]").checked)
    .map((row) => ({ name: row.dataset.name, scale: Number(row.querySelector("input[type=number]").value) }));
}

function settingsLine(v) {
  const parts = [v.size, `${v.num_frames} frames`, `${v.num_inference_steps} steps`, `guidance ${v.guidance_scale}`,
                 `seed ${v.seed}`];
  if (v.input_reference) parts.push("image");
  if (v.loras.length) parts.push("LoRA " + v.loras.map((l) => `${l.name}×${l.scale}`).join(", "));
  if (v.generation_seconds) parts.push(`${v.generation_seconds.toFixed(1)} s`);
  return parts.join(" · ");
}

async function submit(event) {
  event.preventDefault();
  $("form-error").textContent = "";
  const form = new FormData();
  form.append("prompt", $("prompt").value);
  form.append("negative_prompt", $("negative-prompt").value);
  form.append("size", $("size").value);
  form.append("num_frames", $("frames").value);
  form.append("num_inference_steps", $("steps").value);
  form.append("guidance_scale", $("guidance").value);
  if ($("seed").value !== "") form.append("seed", $("seed").value);
  const loras = selectedLoras();
  if (loras.length) form.append("loras", JSON.stringify(loras));
  if ($("image").files.length) form.append("input_reference", $("image").files[0]);
  $("generate").disabled = true;
  try {
    const video = await api("/v1/videos", { method: "POST", body: form });
    state.current = video.id;
    showCurrent(video);
    refresh();
  } catch (error) {
    $("form-error").textContent = error.message;
  } finally {
    $("generate").disabled = false;
  }
}

function showCurrent(v) {
  $("current-empty").classList.add("hidden");
  $("current-job").classList.remove("hidden");
  $("current-prompt").textContent = v.prompt;
  $("current-settings").textContent = settingsLine(v);
  const progress = $("current-progress");
  progress.value = v.progress;
  const preview = $("current-preview"), video = $("current-video"), download = $("current-download");
  let status = v.status.replace("_", " ");
  if (v.status === "queued") status += ` (${v.queue_position} ahead)`;
  if (v.status === "in_progress") status += ` · ${v.progress} %`;
  if (v.error) status += `: ${v.error.message}`;
  $("current-status").textContent = status;
  $("cancel").classList.toggle("hidden", !(v.status === "queued" || v.status === "in_progress"));
  if (v.status === "in_progress") {
    preview.classList.remove("hidden");
    const img = new Image();
    img.onload = () => { preview.src = img.src; };
    img.src = `/v1/videos/${v.id}/content?variant=preview&t=${Date.now()}`;
  }
  if (v.status === "completed") {
    preview.classList.add("hidden");
    const src = `/v1/videos/${v.id}/content`;
    if (video.dataset.id !== v.id) {
      video.dataset.id = v.id;
      video.src = src;
      video.classList.remove("hidden");
      video.play().catch(() => {});
    }
    download.href = `${src}?download=true`;
    download.setAttribute("download", `${v.id}.mp4`);
    download.classList.remove("hidden");
    if ($("seed").value === "") $("seed").placeholder = `random (last: ${v.seed})`;
  } else {
    video.classList.add("hidden");
    video.removeAttribute("src");
    delete video.dataset.id;
    download.classList.add("hidden");
  }
}

function card(v) {
  const el = document.createElement("div");
  el.className = "card";
  el.dataset.id = v.id;
  const [w, h] = v.size.split("x").map(Number);
  el.style.setProperty("--aspect", `${w} / ${h}`);
  let media;
  if (v.status === "completed") {
    media = document.createElement("video");
    media.src = `/v1/videos/${v.id}/content`;
    media.poster = `/v1/videos/${v.id}/content?variant=thumbnail`;
    media.loop = true; media.muted = true; media.playsInline = true; media.preload = "none";
    media.addEventListener("mouseenter", () => media.play().catch(() => {}));
    media.addEventListener("mouseleave", () => media.pause());
    media.controls = true;
  } else {
    media = document.createElement("div");
    media.className = "placeholder";
    media.textContent = v.status === "failed" ? "failed" : `${v.status.replace("_", " ")} ${v.progress} %`;
  }
  el.appendChild(media);
  const title = document.createElement("p");
  title.innerHTML = `<span class="badge ${v.status}"></span> `;
  title.querySelector(".badge").textContent = v.status.replace("_", " ");
  title.appendChild(document.createTextNode(v.prompt));
  el.appendChild(title);
  const settings = document.createElement("p");
  settings.className = "muted settings";
  settings.textContent = settingsLine(v) + (v.error ? ` · ${v.error.message}` : "");
  el.appendChild(settings);
  const actions = document.createElement("div");
  actions.className = "actions";
  if (v.status === "completed") {
    const a = document.createElement("a");
    a.className = "button download"; a.textContent = "Download";
    a.href = `/v1/videos/${v.id}/content?download=true`; a.setAttribute("download", `${v.id}.mp4`);
    actions.appendChild(a);
  }
  const reuse = document.createElement("button");
  reuse.textContent = "Reuse settings";
  reuse.onclick = () => reuseSettings(v);
  actions.appendChild(reuse);
  const del = document.createElement("button");
  del.textContent = v.status === "queued" || v.status === "in_progress" ? "Cancel" : "Delete";
  del.onclick = () => remove(v.id);
  actions.appendChild(del);
  el.appendChild(actions);
  return el;
}

function reuseSettings(v) {
  $("prompt").value = v.prompt;
  if (v.negative_prompt !== null) $("negative-prompt").value = v.negative_prompt;
  for (const [id, value] of [["size", v.size], ["frames", String(v.num_frames)]]) {
    const select = $(id);
    if (![...select.options].some((o) => o.value === value)) option(select, value, value, false);
    select.value = value;
  }
  $("steps").value = v.num_inference_steps;
  $("guidance").value = v.guidance_scale;
  $("seed").value = v.seed;
  window.scrollTo({ top: 0, behavior: "smooth" });
}

async function remove(id) {
  try { await api(`/v1/videos/${id}`, { method: "DELETE" }); } catch (error) { $("form-error").textContent = error.message; }
  if (state.current === id) {
    state.current = null;
    $("current-job").classList.add("hidden");
    $("current-empty").classList.remove("hidden");
  }
  refresh();
}

function renderGallery(list) {
  const gallery = $("gallery");
  const existing = new Map([...gallery.children].map((el) => [el.dataset.id, el]));
  const wanted = list.data.map((v) => {
    const old = existing.get(v.id);
    // Keep finished cards (their video may be playing); rebuild the ones whose state changed.
    const key = `${v.status}:${v.progress}`;
    if (old && old.dataset.key === key) return old;
    const el = card(v);
    el.dataset.key = key;
    return el;
  });
  gallery.replaceChildren(...wanted);
  $("gallery-more").classList.toggle("hidden", !list.has_more);
  if (!list.data.length) gallery.innerHTML = '<p class="muted">No videos yet.</p>';
}

async function refresh() {
  try {
    const list = await api(`/v1/videos?limit=${state.galleryLimit}`);
    renderGallery(list);
    const active = list.data.filter((v) => v.status === "queued" || v.status === "in_progress").length;
    $("queue-state").textContent = active ? `${active} in the queue` : "queue empty";
    if (state.current) showCurrent(await api(`/v1/videos/${state.current}`));
  } catch (error) {
    $("queue-state").textContent = `server unreachable: ${error.message}`;
  }
}

function init() {
  $("generate-form").addEventListener("submit", submit);
  $("seed-random").onclick = () => { $("seed").value = ""; };
  $("cancel").onclick = () => state.current && remove(state.current);
  $("gallery-more").onclick = () => { state.galleryLimit = Math.min(100, state.galleryLimit + 24); refresh(); };
  $("image").onchange = () => {
    const file = $("image").files[0];
    const img = $("image-preview");
    if (file) { img.src = URL.createObjectURL(file); img.classList.remove("hidden"); } else img.classList.add("hidden");
  };
  $("image-clear").onclick = () => { $("image").value = ""; $("image-preview").classList.add("hidden"); };
  Promise.all([loadModel(), loadLoras()]).then(refresh).catch((e) => { $("form-error").textContent = e.message; });
  state.timer = setInterval(refresh, 700);
}

init();
