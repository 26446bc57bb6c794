// Shared by every page: the token, requests to the server, the menu, and a small SVG line chart.

// `python -m app ui` printed an address with ?token=...; the server answered it with this cookie. Every change
// (POST) sends it back in the X-Token header, which another site's page cannot do.
const TOKEN = (document.cookie.match(/(?:^|; )prefalign_ui_token=([^;]*)/) || [])[1] || "";

async function api(path, body) {
  const options = body === undefined ? {headers: {"X-Token": TOKEN}}
    : {method: "POST", headers: {"X-Token": TOKEN, "Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) throw new Error(data.error || JSON.stringify(data.detail) || response.statusText);
  return data;
}

// el("p", {class: "x"}, "text", child): a new element
const $ = (id) => document.getElementById(id);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function fillSelect(select, options, chosen) {  // options: strings or {value, label}
  select.replaceChildren(...options.map((o) => el("option", {value: o.value ?? o}, o.label ?? o)));
  if (chosen && options.some((o) => (o.value ?? o) === chosen)) select.value = chosen;
}

function showError(error) {
  const box = $("error");
  box.textContent = error ? String(error.message || error) : "";
  box.hidden = !error;
}

function query(name) { return new URLSearchParams(location.search).get(name); }

function remember(values) {  // the page's choices in its address, so a reload comes back to them
  const params = new URLSearchParams(location.search);
  for (const [name, value] of Object.entries(values)) if (value) params.set(name, value); else params.delete(name);
  history.replaceState(null, "", location.pathname + "?" + params);
}

function menu() {
  const pages = ["label", "train", "runs", "compare", "chat"];
  const here = location.pathname.slice(1);
  document.body.prepend(el("nav", {}, el("strong", {}, "prefalign"),
    ...pages.map((p) => el("a", {href: "/" + p, class: p === here ? "here" : ""}, p[0].toUpperCase() + p.slice(1)))));
}

// lineChart(svg, points, key, title): one series of {step, [key]: value} as a polyline with its range labelled
function lineChart(svg, points, key, title) {
  const w = 300, h = 150, pad = 30;
  const shown = points.filter((p) => p[key] !== null && p[key] !== undefined);
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attributes, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
  };
  add("text", {x: pad, y: 14, class: "title"}, `${title}` + (shown.length ? `: ${shown.at(-1)[key].toFixed(3)}` : ""));
  add("rect", {x: pad, y: 20, width: w - pad - 5, height: h - 40, class: "frame"});
  if (!shown.length) return;
  const steps = shown.map((p) => p.step), values = shown.map((p) => p[key]);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps, Math.min(...steps) + 1)];
  let [y0, y1] = [Math.min(...values), Math.max(...values)];
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const x = (s) => pad + (s - x0) / (x1 - x0) * (w - pad - 5);
  const y = (v) => h - 20 - (v - y0) / (y1 - y0) * (h - 40);
  add("polyline", {points: shown.map((p) => `${x(p.step)},${y(p[key])}`).join(" "), class: "line"});
  for (const p of shown) add("circle", {cx: x(p.step), cy: y(p[key]), r: 2, class: "point"});
  add("text", {x: 2, y: 26, class: "tick"}, y1.toFixed(2));
  add("text", {x: 2, y: h - 20, class: "tick"}, y0.toFixed(2));
  add("text", {x: pad, y: h - 5, class: "tick"}, `step ${x0}`);
  add("text", {x: w - 60, y: h - 5, class: "tick"}, `step ${x1}`);
}

menu();
