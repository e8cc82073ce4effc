// The search page: one POST /v1/search, the first stage's top k beside EDJE's re-ranked top k.
// No framework and nothing from a CDN: the page works with no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("key");
keyInput.value = sessionStorage.getItem("edje-api-key") || "";

function headers() {
  const key = keyInput.value.trim();
  sessionStorage.setItem("edje-api-key", key);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// Images need the API key too, so they are fetched and shown from blob URLs.
async function imageURL(url) {
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) return "";
  return URL.createObjectURL(await response.blob());
}

function tile(hit, place, label) {
  const item = document.createElement("li");
  item.className = "tile";
  item.dataset.id = hit.id;
  const img = document.createElement("img");
  img.alt = hit.id;
  img.loading = "lazy";
  imageURL(hit.image_url).then((src) => { if (src) img.src = src; });
  const id = document.createElement("div");
  id.className = "id";
  id.textContent = `${place + 1}. ${hit.id}`;
  const score = document.createElement("div");
  score.textContent = label(hit);
  item.append(img, id, score);
  if (hit.score !== null && hit.score !== undefined) {
    const moved = hit.first_stage_rank - place;
    const rank = document.createElement("div");
    rank.className = moved > 0 ? "moved-up" : moved < 0 ? "moved-down" : "";
    rank.textContent = `first stage #${hit.first_stage_rank + 1}` +
      (moved ? ` (${moved > 0 ? "up" : "down"} ${Math.abs(moved)})` : "");
    item.append(rank);
  }
  return item;
}

function show(list, hits, label) {
  list.replaceChildren(...hits.map((hit, place) => tile(hit, place, label)));
}

async function search(query, k, rerankTopK) {
  const status = $("status");
  status.className = "";
  status.textContent = `searching for “${query}”…`;
  const response = await fetch("/v1/search", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...headers() },
    body: JSON.stringify({ query, k, rerank_top_k: rerankTopK }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    status.className = "error";
    status.textContent = `${response.status}: ${body.detail || body.message || response.statusText}`;
    document.body.dataset.state = "error";
    return;
  }
  const byFirstStage = [...body.hits].sort((a, b) => a.first_stage_rank - b.first_stage_rank);
  show($("first"), byFirstStage, (h) => `cosine ${h.first_stage_score.toFixed(3)}`);
  show($("edje"), body.hits, (h) =>
    h.score === null || h.score === undefined ? "not re-ranked" : `EDJE logit ${h.score.toFixed(3)}`);
  const t = body.timings_ms || {};
  $("timings").textContent = Object.entries(t).map(([k, v]) => `${k} ${v.toFixed(1)} ms`).join(" · ");
  status.textContent = `${body.hits.length} results for “${query}”`;
  document.body.dataset.state = "done";
}

function run(push) {
  const query = $("q").value.trim();
  if (!query) return;
  const k = Number($("k").value) || 8;
  const rerankTopK = Number($("rerank").value);
  if (push) {
    const url = new URL(window.location);
    url.searchParams.set("q", query);
    history.pushState({}, "", url);
  }
  search(query, k, Number.isFinite(rerankTopK) ? rerankTopK : k).catch((err) => {
    $("status").className = "error";
    $("status").textContent = `request failed: ${err}`;
    document.body.dataset.state = "error";
  });
}

$("search").addEventListener("submit", (event) => { event.preventDefault(); run(true); });
window.addEventListener("popstate", () => {
  $("q").value = new URLSearchParams(window.location.search).get("q") || "";
  run(false);
});
const initial = new URLSearchParams(window.location.search);
if (initial.get("k")) $("k").value = initial.get("k");
if (initial.get("q")) { $("q").value = initial.get("q"); run(false); }
