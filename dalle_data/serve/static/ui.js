// The collection page: reads /ui/api/*, generates through the same POST /dalle that
// dalle-service's front-end uses. No framework and nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

// A lineage name, breakable after each "_" so narrow columns wrap at its parts.
function nameNode(tag, name, className) {
  const node = el(tag, null, className);
  String(name).split("_").forEach((part, i, parts) => {
    node.append(i < parts.length - 1 ? `${part}_` : part);
    if (i < parts.length - 1) node.append(document.createElement("wbr"));
  });
  return node;
}

function fmt(value, digits = 3) {
  return typeof value === "number" ? value.toFixed(digits) : "–";
}

function bestLoss(model) {
  const losses = (model.evals || []).map((e) => e.loss).filter((l) => typeof l === "number");
  return losses.length ? Math.min(...losses) : null;
}

let collection = null;

async function getJSON(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

function renderModels(models) {
  const body = $("models");
  body.replaceChildren();
  for (const model of models) {
    const row = el("tr");
    row.dataset.name = model.name;
    row.tabIndex = 0;
    const name = nameNode("td", model.name, "name");
    if ((model.problems || []).length) name.append(el("span", "!", "flag"));
    row.append(
      name,
      el("td", model.family, "family " + (model.family || "")),
      el("td", model.lineage || "–"),
      el("td", model.epochs ?? "–", "num"),
      el("td", fmt(bestLoss(model)), "num"),
    );
    row.addEventListener("click", () => showModel(model.name));
    row.addEventListener("keydown", (e) => { if (e.key === "Enter") showModel(model.name); });
    body.append(row);
  }
  const select = $("model");
  select.replaceChildren(...models.map((m) => {
    const option = el("option", m.name);
    option.value = m.name;
    return option;
  }));
  $("skipped").replaceChildren(...(collection.skipped || []).map((s) => el("li", `not served: ${s}`)));
}

function renderLeaderboards(boards) {
  const box = $("leaderboards");
  box.replaceChildren();
  if (!boards.length) {
    box.append(el("p", "No held-out scores yet: `dalle-data evaluate CHECKPOINT --shards EVAL_DIR` adds them.", "hint"));
    return;
  }
  for (const board of boards) {
    const sha = board.manifest_sha256 ? ` · eval set ${board.manifest_sha256.slice(0, 10)}` : "";
    box.append(el("h3", `${board.dataset}${sha}`));
    const table = el("table", null, "board");
    const head = el("tr");
    for (const title of ["#", "model", "loss", "text", "image", "bits/token", "samples"]) head.append(el("th", title));
    table.append(el("thead"));
    table.tHead.append(head);
    const body = el("tbody");
    board.rows.forEach((row, i) => {
      const tr = el("tr");
      tr.addEventListener("click", () => showModel(row.name));
      tr.append(
        el("td", i + 1, "rank"),
        nameNode("td", row.name, "name"),
        el("td", fmt(row.loss), "num strong"),
        el("td", fmt(row.text_loss), "num"),
        el("td", fmt(row.image_loss), "num"),
        el("td", fmt(row.bits_per_image_token), "num"),
        el("td", row.samples ?? "–", "num"),
      );
      body.append(tr);
    });
    table.append(body);
    box.append(table);
  }
}

function renderTree(models) {
  // Children hang under the parent whose sha256 they record; the rest are roots.
  const bySha = new Map(models.map((m) => [m.sha256, m]));
  const children = new Map();
  const roots = [];
  for (const model of models) {
    const parent = model.parent && bySha.get(model.parent.sha256);
    if (parent && parent !== model) {
      if (!children.has(parent.sha256)) children.set(parent.sha256, []);
      children.get(parent.sha256).push(model);
    } else {
      roots.push(model);
    }
  }
  const seen = new Set();
  const branch = (list) => {
    const ul = el("ul");
    for (const model of list) {
      if (seen.has(model.sha256)) continue;
      seen.add(model.sha256);
      const li = el("li");
      const node = nameNode("button", model.name, "node");
      node.type = "button";
      node.addEventListener("click", () => showModel(model.name));
      li.append(node);
      const loss = bestLoss(model);
      if (loss !== null) li.append(el("span", `loss ${fmt(loss)}`, "badge"));
      if (model.parent && !bySha.has(model.parent.sha256) && model.parent.name) {
        li.append(el("span", `parent ${model.parent.name} not in the collection`, "badge warn"));
      }
      const kids = children.get(model.sha256);
      if (kids) li.append(branch(kids));
      ul.append(li);
    }
    return ul;
  };
  $("tree").replaceChildren(branch(roots));
  const picture = $("lineage-picture");
  if (collection.lineage_picture) {
    picture.src = "/ui/lineage.png";
    picture.hidden = false;
  }
}

async function showModel(name) {
  const model = collection.models.find((m) => m.name === name);
  if (!model) return;
  for (const row of $("models").children) row.classList.toggle("selected", row.dataset.name === name);
  const detail = $("detail");
  detail.hidden = false;
  $("detail-name").textContent = name;
  $("detail-problems").replaceChildren(...(model.problems || []).map((p) => el("li", p)));
  const card = $("card");
  if (model.card) {
    card.textContent = "loading the card…";
    const { html } = await getJSON(`/ui/api/models/${encodeURIComponent(name)}/card`);
    card.innerHTML = html; // rendered by the server with raw HTML escaped
  } else {
    card.replaceChildren(el("p", "This checkpoint has no model card (README.md beside it).", "hint"));
  }
  const figure = $("samples-figure");
  figure.hidden = !model.samples;
  if (model.samples) $("samples").src = `/ui/api/models/${encodeURIComponent(name)}/files/samples.png`;
  detail.scrollIntoView({ behavior: "smooth", block: "start" });
}

async function generate(event) {
  event.preventDefault();
  const status = $("gen-status");
  const button = $("go");
  const seedText = $("seed").value.trim();
  const body = {
    text: $("prompt").value,
    num_images: Number($("num-images").value),
    dalle_name: $("model").value,
  };
  if (seedText !== "") body.seed = Number(seedText);
  button.disabled = true;
  status.className = "status busy";
  status.textContent = `generating ${body.num_images} image(s) with ${body.dalle_name}…`;
  const started = performance.now();
  try {
    // As dalle-service's front-end sends it: a JSON string, no JSON content type.
    const response = await fetch("/dalle", { method: "POST", body: JSON.stringify(body) });
    const answer = await response.json();
    if (!response.ok) {
      const retry = response.headers.get("Retry-After");
      throw new Error(`${answer.detail || response.statusText}${retry ? ` (retry in ${retry} s)` : ""}`);
    }
    const results = $("results");
    results.replaceChildren(...answer.map((b64, i) => {
      const img = el("img", null, "generated");
      img.alt = `${body.text} (${i + 1})`;
      img.src = `data:image/jpeg;base64,${b64}`;
      return img;
    }));
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const notes = [`${answer.length} image(s) in ${seconds} s`, `seed ${response.headers.get("X-Seed")}`];
    if (response.headers.get("X-Model-Load") === "loaded") notes.push("model loaded for this request");
    const cut = response.headers.get("X-Text-Truncated");
    if (cut) notes.push(`prompt truncated: ${cut}`);
    status.className = cut ? "status warn" : "status ok";
    status.textContent = notes.join(" · ");
  } catch (err) {
    status.className = "status error";
    status.textContent = err.message;
  } finally {
    button.disabled = false;
  }
}

async function main() {
  try {
    collection = await getJSON("/ui/api/collection");
  } catch (err) {
    $("counts").textContent = `cannot read the collection: ${err.message}`;
    return;
  }
  const models = collection.models;
  $("root-name").textContent = collection.root;
  const families = [...new Set(models.map((m) => m.family))].filter(Boolean).join(", ");
  $("counts").textContent = `${models.length} model(s)${families ? ` · ${families}` : ""} · up to ${collection.limits.max_images} images per request`;
  $("num-images").max = collection.limits.max_images;
  renderModels(models);
  renderLeaderboards(collection.leaderboards);
  renderTree(models);
  $("prompt-form").addEventListener("submit", generate);
  $("use-model").addEventListener("click", () => {
    $("model").value = $("detail-name").textContent;
    $("prompt").focus();
    $("generate").scrollIntoView({ behavior: "smooth" });
  });
  document.body.dataset.ready = "true";
}

main();
