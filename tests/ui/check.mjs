// The browser half of `make ui-check`: opens each page of a plan in headless Chromium, does its clicks,
// waits for the texts it expects, saves a screenshot, and writes what it saw to results.json.
// Usage: node check.mjs PLAN.json OUT_DIR. The plan (written by ui_check.py) lists
// {name, url, expect: [text], absent: [text], click: text, then: url, expand: text, fresh: bool}; `fresh`
// empties the browser's local storage first (a browser that never chose a mode), `click` clicks the button
// with that text, then loads `then` if given; `expand` waits for that run and unfolds the first parent
// run's child runs in the runs table. One tab throughout: @sparticuz/chromium runs as a single process.
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import chromium from "@sparticuz/chromium";
import puppeteer from "puppeteer-core";

const [planPath, outDir] = process.argv.slice(2);
const plan = JSON.parse(readFileSync(planPath, "utf8"));
mkdirSync(outDir, { recursive: true });
const WAIT_MS = 90_000; // a cold `mlflow ui` on a busy 2-core machine answers slowly; never a failure alone

const browser = await puppeteer.launch({
  executablePath: await chromium.executablePath(),
  args: [...chromium.args, "--lang=en-US"],
  headless: true,
  defaultViewport: { width: 1680, height: 1000 }, // room for the page beside MLflow's assistant panel
});

// Page text with every run of white space (line breaks, no-break spaces) as one space, as expected texts are.
async function textOf(page) {
  return page.evaluate(() => document.body.innerText.replace(/\s+/g, " "));
}

async function waitForTexts(page, texts) {
  try {
    await page.waitForFunction(
      (wanted) => wanted.every((t) => document.body.innerText.replace(/\s+/g, " ").includes(t)),
      { timeout: WAIT_MS, polling: 500 },
      texts,
    );
  } catch {
    // reported below, with the texts that are missing
  }
}

async function clickButton(page, label) {
  const handle = await page.waitForFunction(
    (text) => [...document.querySelectorAll("button, [role=button]")].find((b) => b.innerText.trim() === text),
    { timeout: WAIT_MS, polling: 500 },
    label,
  );
  await handle.asElement().click();
}

const results = [];
const page = await browser.newPage();
for (const step of plan.pages) {
  const result = { name: step.name, url: step.url, missing: [], present: [], error: null };
  try {
    if (step.fresh) {
      await page.goto(step.url, { waitUntil: "networkidle2", timeout: WAIT_MS });
      await page.evaluate(() => localStorage.clear());
    }
    await page.goto(step.url, { waitUntil: "networkidle2", timeout: WAIT_MS });
    if (step.fresh) await page.reload({ waitUntil: "networkidle2", timeout: WAIT_MS });
    if (step.click) {
      await clickButton(page, step.click);
      await new Promise((r) => setTimeout(r, 1000));
      if (step.then) {
        await page.goto(step.then, { waitUntil: "networkidle2", timeout: WAIT_MS });
        await page.reload({ waitUntil: "networkidle2", timeout: WAIT_MS }); // the mode comes from storage
      }
    }
    if (step.expand) {
      await waitForTexts(page, [step.expand]);
      await page.click('button[data-component-id*="runnamecellrenderer"]');
    }
    await waitForTexts(page, step.expect);
    await new Promise((r) => setTimeout(r, 1500)); // charts and lazy cells settle
    const text = await textOf(page);
    result.final_url = page.url();
    result.missing = step.expect.filter((t) => !text.includes(t));
    result.present = (step.absent || []).filter((t) => text.includes(t));
    result.text = text.slice(0, 6000);
  } catch (err) {
    result.error = String(err);
  }
  result.screenshot = `${outDir}/${step.name}.png`;
  await page.screenshot({ path: result.screenshot, fullPage: false });
  results.push(result);
}
await browser.close();
writeFileSync(`${outDir}/results.json`, JSON.stringify(results, null, 2));
const failed = results.filter((r) => r.error || r.missing.length || r.present.length);
for (const r of results) {
  const verdict = r.error || r.missing.length || r.present.length ? "FAIL" : "ok";
  console.log(`${verdict}  ${r.name}  ${r.url}`);
  if (r.missing.length) console.log(`      missing: ${JSON.stringify(r.missing)}`);
  if (r.present.length) console.log(`      should be absent: ${JSON.stringify(r.present)}`);
  if (r.error) console.log(`      error: ${r.error}`);
}
process.exit(failed.length ? 1 : 0);
