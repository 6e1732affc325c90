// The browser half of `make ui-check`: opens each page of a plan in headless Chromium, does its clicks,
// waits for the texts it expects, saves a screenshot, and writes what it saw to results.json.
// Usage: node check.mjs PLAN.json OUT_DIR. The plan (written by ui_check.py) lists
// {name, url, expect: [text], absent: [text], click: text | null, expand: bool, fresh: bool}; `fresh` opens
// the page in a new browser context (empty local storage), `click` clicks the button with that text first,
// then loads `then` (a URL) if given; `expand` unfolds the first parent run's child runs in the runs table.
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
  defaultViewport: { width: 1440, height: 1000 },
});

async function textOf(page) {
  return page.evaluate(() => document.body.innerText);
}

async function waitForTexts(page, texts) {
  try {
    await page.waitForFunction(
      (wanted) => wanted.every((t) => document.body.innerText.includes(t)),
      { timeout: WAIT_MS, polling: 500 },
      texts,
    );
  } catch {
    // reported below, with the texts that are missing
  }
}

async function clickButton(page, label) {
  const handle = await page.waitForFunction(
    (text) => [...document.querySelectorAll("button, [role=radio], label")].find((b) => b.innerText.trim() === text),
    { timeout: WAIT_MS, polling: 500 },
    label,
  );
  await handle.asElement().click();
}

async function closeAssistant(page) {
  // MLflow's own assistant panel opens beside the page; close it so the screenshot shows the page.
  await page.evaluate(() => {
    const panel = [...document.querySelectorAll("*")].find((e) => e.innerText === "MLflow Assistant");
    const close = panel?.closest("div")?.parentElement?.querySelector('button[aria-label="Close"]');
    close?.click();
  });
}

const results = [];
let context = await browser.createBrowserContext();
for (const step of plan.pages) {
  if (step.fresh) {
    await context.close();
    context = await browser.createBrowserContext();
  }
  const page = await context.newPage();
  const result = { name: step.name, url: step.url, missing: [], present: [], error: null };
  try {
    await page.goto(step.url, { waitUntil: "networkidle2", timeout: WAIT_MS });
    if (step.click) {
      await clickButton(page, step.click);
      await new Promise((r) => setTimeout(r, 1000));
      if (step.then) await page.goto(step.then, { waitUntil: "networkidle2", timeout: WAIT_MS });
    }
    if (step.expand) {
      await waitForTexts(page, [step.expand]);
      await page.click('button[data-component-id*="runnamecellrenderer"]');
    }
    await waitForTexts(page, step.expect);
    await closeAssistant(page);
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
  await page.close();
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
