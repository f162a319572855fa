// ngt-ray report: sort and filter the contact sheets, keep a reviewer's verdicts, export them as labels.csv.
// Plain DOM, no library and no network: the page works from a folder opened as file://.
"use strict";

const storageKey = "ngt-ray-labels:" + document.body.dataset.run;
const labels = new Map(JSON.parse(localStorage.getItem(storageKey) || "[]"));

function cards(sheet) {
  return Array.from(sheet.querySelectorAll(".card"));
}

function showLabel(card) {
  const label = labels.get(card.dataset.uri);
  card.dataset.label = label === undefined ? "" : String(label);
  for (const button of card.querySelectorAll("button[data-label]")) {
    button.setAttribute("aria-pressed", String(button.dataset.label === card.dataset.label));
  }
}

function countLabels() {
  const positives = Array.from(labels.values()).filter((v) => v === 1).length;
  for (const out of document.querySelectorAll(".label-count")) {
    out.textContent = `${labels.size} labelled (${positives} confirmed, ${labels.size - positives} rejected)`;
  }
}

function setLabel(card, value) {
  const uri = card.dataset.uri;
  if (labels.get(uri) === value) labels.delete(uri); // a second click takes the verdict back
  else labels.set(uri, value);
  localStorage.setItem(storageKey, JSON.stringify(Array.from(labels.entries())));
  showLabel(card);
  countLabels();
  applyView(card.closest(".sheet"));
}

const orders = {
  "score-desc": (a, b) => b.dataset.score - a.dataset.score,
  "score-asc": (a, b) => a.dataset.score - b.dataset.score,
  "uri": (a, b) => a.dataset.uri.localeCompare(b.dataset.uri),
  "group": (a, b) => a.dataset.group - b.dataset.group || b.dataset.score - a.dataset.score,
};

function applyView(sheet) {
  const tools = document.querySelector(`.tools[data-sheet="${sheet.id}"]`);
  const text = tools.querySelector(".filter").value.trim().toLowerCase();
  const decided = tools.querySelector(".decided").value;
  const verdict = tools.querySelector(".verdict").value;
  const grid = sheet.querySelector(".grid");
  let shown = 0;
  for (const card of cards(sheet).sort(orders[tools.querySelector(".order").value])) {
    grid.appendChild(card); // in the chosen order
    const visible = (!text || card.dataset.uri.toLowerCase().includes(text)) &&
      (!decided || card.dataset.decided === decided) &&
      (!verdict || (verdict === "none" ? card.dataset.label === "" : card.dataset.label === verdict));
    card.hidden = !visible;
    shown += visible;
  }
  tools.querySelector(".shown").textContent = `${shown} shown`;
}

function csvField(value) {
  return /[",\r\n]/.test(value) ? `"${value.replace(/"/g, '""')}"` : value;
}

function exportLabels() {
  const lines = ["uri,label"];
  for (const [uri, label] of labels) lines.push(`${csvField(uri)},${label}`);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "text/csv" }));
  link.download = "labels.csv";
  document.body.appendChild(link);
  link.click();
  link.remove();
}

for (const sheet of document.querySelectorAll(".sheet")) {
  for (const card of cards(sheet)) {
    showLabel(card);
    for (const button of card.querySelectorAll("button[data-label]")) {
      button.addEventListener("click", () => setLabel(card, Number(button.dataset.label)));
    }
  }
  const tools = document.querySelector(`.tools[data-sheet="${sheet.id}"]`);
  for (const control of tools.querySelectorAll("input, select")) {
    control.addEventListener("input", () => applyView(sheet));
  }
  applyView(sheet);
}
for (const button of document.querySelectorAll(".export")) button.addEventListener("click", exportLabels);
countLabels();
