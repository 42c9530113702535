// dsv3 serve, driven by the official `openai` npm client exactly as an application uses it:
// models, chat and completions (whole and streamed, with usage), greedy answers equal to
// `dsv3 generate --temperature 0` one at a time and 16 at once, n > 1, stop strings,
// log-probabilities, context-cache hits, and the client's error classes for bad requests.
// Usage: node openai_client.mjs DSV3_BINARY PROJECT_ROOT NPM_PREFIX
import { spawn, execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import assert from 'node:assert/strict';

const [dsv3, root, npmPrefix] = process.argv.slice(2);
let OpenAI;
try {
  const mod = createRequire(path.resolve(npmPrefix, 'index.js'))('openai');
  OpenAI = mod.OpenAI ?? mod.default ?? mod;
} catch (e) {
  console.error(`the openai npm client is not in ${npmPrefix}: run scripts/setup.sh (${e.message})`);
  process.exit(1);
}

// A servable folder: a golden checkpoint (vocabulary 500) with a 500-token tokenizer.
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dsv3-openai-'));
execFileSync(dsv3, ['train-tokenizer', '--input', path.join(root, 'data/kjv-verses.txt.gz'), '--vocab-size', '500', '--out', dir],
             { stdio: 'ignore' });
for (const f of ['config.json', 'model.safetensors'])
  fs.copyFileSync(path.join(root, 'tests/data/golden/tiny-v3-bf16', f), path.join(dir, f));

const key = 'sk-dsv3-test';
const server = spawn(dsv3, ['serve', '--model', dir, '--port', '0', '--api-key', key, '--served-model-name', 'tiny'],
                     { stdio: ['ignore', 'ignore', 'pipe'] });
let log = '';
const port = await new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error(`the server did not start in 60 s:\n${log}`)), 60000);
  server.stderr.on('data', (d) => {
    log += d;
    const m = log.match(/listening on http:\/\/127\.0\.0\.1:(\d+)/);
    if (m && log.includes('ready')) clearTimeout(timer), resolve(Number(m[1]));
  });
  server.on('exit', (code) => reject(new Error(`the server exited (${code}):\n${log}`)));
});

const client = new OpenAI({ apiKey: key, baseURL: `http://127.0.0.1:${port}/v1`, maxRetries: 0, timeout: 60000 });
const failures = [];
async function check(name, fn) {
  try {
    await fn();
    console.log(`ok   ${name}`);
  } catch (e) {
    failures.push(name);
    console.log(`FAIL ${name}\n${e.stack}`);
  }
}
// Text compared without U+FFFD: the server replaces invalid UTF-8 (a random model's bytes)
// as JSON needs, and Node's decoder may group the bytes differently.
const clean = (s) => s.replaceAll('\uFFFD', '');

// `dsv3 generate --temperature 0` on the same folder: its stdout is the prompt, the text, "\n".
function generate(prompt, maxTokens) {
  const out = execFileSync(dsv3, ['generate', '--model', dir, '--prompt', prompt, '--max-tokens', String(maxTokens), '--temperature', '0'],
                           { stdio: ['ignore', 'pipe', 'ignore'] });
  const text = new TextDecoder('utf-8').decode(out);
  assert.ok(text.startsWith(prompt));
  return clean(text.slice(prompt.length, text.endsWith('\n') ? -1 : undefined));
}

await check('models.list names the served model', async () => {
  const models = await client.models.list();
  assert.equal(models.data.length, 1);
  assert.equal(models.data[0].id, 'tiny');
});

const prompts = ['In the beginning', 'And God said', 'The LORD is my shepherd', 'Jesus wept.'];
const expected = prompts.map((p) => generate(p, 16));

await check('greedy completions equal dsv3 generate, one at a time', async () => {
  for (let i = 0; i < prompts.length; ++i) {
    const r = await client.completions.create({ model: 'tiny', prompt: prompts[i], max_tokens: 16, temperature: 0 });
    assert.equal(r.object, 'text_completion');
    assert.equal(clean(r.choices[0].text), expected[i]);
    assert.equal(r.usage.completion_tokens, 16);
  }
});

await check('greedy completions equal dsv3 generate, 16 at once', async () => {
  const all = await Promise.all(Array.from({ length: 16 }, (_, k) =>
    client.completions.create({ model: 'tiny', prompt: prompts[k % prompts.length], max_tokens: 16, temperature: 0 })));
  all.forEach((r, k) => assert.equal(clean(r.choices[0].text), expected[k % prompts.length], `client ${k}`));
});

await check('chat: whole and streamed with usage agree', async () => {
  const req = { model: 'tiny', messages: [{ role: 'system', content: 'Answer from the Bible.' }, { role: 'user', content: 'Who begat Enos?' }],
                max_tokens: 20, temperature: 0 };
  const whole = await client.chat.completions.create(req);
  assert.equal(whole.object, 'chat.completion');
  assert.equal(whole.choices[0].message.role, 'assistant');
  assert.ok(['stop', 'length'].includes(whole.choices[0].finish_reason));
  assert.equal(whole.usage.total_tokens, whole.usage.prompt_tokens + whole.usage.completion_tokens);
  assert.equal(typeof whole.usage.prompt_cache_hit_tokens, 'number');
  assert.equal(whole.usage.prompt_cache_hit_tokens + whole.usage.prompt_cache_miss_tokens, whole.usage.prompt_tokens);
  const stream = await client.chat.completions.create({ ...req, stream: true, stream_options: { include_usage: true } });
  let text = '', finish = null, usage = null, chunks = 0;
  for await (const chunk of stream) {
    ++chunks;
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) usage = chunk.usage;
    for (const c of chunk.choices) {
      text += c.delta.content ?? '';
      if (c.finish_reason) finish = c.finish_reason;
    }
  }
  assert.ok(chunks >= 3);
  assert.equal(text, whole.choices[0].message.content);
  assert.equal(finish, whole.choices[0].finish_reason);
  assert.equal(usage.completion_tokens, whole.usage.completion_tokens);
});

await check('streamed completions equal whole ones', async () => {
  const stream = await client.completions.create({ model: 'tiny', prompt: prompts[0], max_tokens: 16, temperature: 0, stream: true });
  let text = '';
  for await (const chunk of stream) text += chunk.choices[0]?.text ?? '';
  assert.equal(clean(text), expected[0]);
});

await check('n > 1 choices, stop strings, log-probabilities', async () => {
  const r = await client.completions.create({ model: 'tiny', prompt: prompts[0], max_tokens: 16, temperature: 0, n: 3 });
  assert.equal(r.choices.length, 3);
  for (const c of r.choices) assert.equal(clean(c.text), expected[0]);
  const full = (await client.completions.create({ model: 'tiny', prompt: prompts[1], max_tokens: 16, temperature: 0 })).choices[0].text;
  const stop = full.slice(4, 7);
  const s = await client.completions.create({ model: 'tiny', prompt: prompts[1], max_tokens: 16, temperature: 0, stop: [stop] });
  assert.equal(s.choices[0].text, full.slice(0, full.indexOf(stop)));
  assert.equal(s.choices[0].finish_reason, 'stop');
  const lp = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Hi' }], max_tokens: 5,
                                                    temperature: 0, logprobs: true, top_logprobs: 2 });
  assert.equal(lp.choices[0].logprobs.content.length, lp.usage.completion_tokens);
  for (const t of lp.choices[0].logprobs.content) {
    assert.ok(t.logprob <= 0);
    assert.equal(t.top_logprobs.length, 2);
  }
});

await check('a repeated long prompt hits the context cache in 64-token blocks', async () => {
  const prompt = 'And the LORD spake unto Moses, saying, Speak unto the children of Israel. '.repeat(10);
  const cold = await client.completions.create({ model: 'tiny', prompt, max_tokens: 8, temperature: 0 });
  const warm = await client.completions.create({ model: 'tiny', prompt, max_tokens: 8, temperature: 0 });
  assert.ok(warm.usage.prompt_cache_hit_tokens >= 64, JSON.stringify(warm.usage));
  assert.equal(warm.usage.prompt_cache_hit_tokens % 64, 0);
  assert.equal(warm.choices[0].text, cold.choices[0].text);
});

await check('response_format json_schema: answers that end parse and fit the schema', async () => {
  const schema = { type: 'object', properties: { answer: { type: 'boolean' }, book: { enum: ['Genesis', 'Exodus'] } },
                   required: ['answer', 'book'], additionalProperties: false };
  let ended = 0;
  for (let seed = 0; seed < 4; ++seed) {
    const r = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Which book? JSON.' }],
      max_tokens: 200, seed, response_format: { type: 'json_schema', json_schema: { name: 'answer', schema, strict: true } } });
    if (r.choices[0].finish_reason !== 'stop') continue;
    ++ended;
    const parsed = JSON.parse(r.choices[0].message.content);
    assert.equal(typeof parsed.answer, 'boolean');
    assert.ok(['Genesis', 'Exodus'].includes(parsed.book));
  }
  assert.ok(ended >= 2, `only ${ended} of 4 ended`);
  await assert.rejects(client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'hi' }],
    response_format: { type: 'json_schema', json_schema: { name: 'x', schema: { type: 'string', pattern: 'a+' } } } }),
    (e) => e instanceof OpenAI.BadRequestError && e.param === 'response_format' && e.code === 'invalid_schema');
});

await check('a forced tool call comes back as message.tool_calls', async () => {
  const tools = [{ type: 'function', function: { name: 'get_weather', description: 'Weather of a city',
    parameters: { type: 'object', properties: { city: { enum: ['Paris', 'Rome'] } }, required: ['city'], additionalProperties: false } } }];
  const r = await client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'Weather in Paris?' }], tools,
    tool_choice: { type: 'function', function: { name: 'get_weather' } }, max_tokens: 600, seed: 3 });
  assert.equal(r.choices[0].finish_reason, 'tool_calls');
  const call = r.choices[0].message.tool_calls[0];
  assert.equal(call.function.name, 'get_weather');
  assert.ok(['Paris', 'Rome'].includes(JSON.parse(call.function.arguments).city));
});

await check('errors arrive as the client\'s error classes', async () => {
  const bad = new OpenAI({ apiKey: 'sk-wrong', baseURL: `http://127.0.0.1:${port}/v1`, maxRetries: 0 });
  await assert.rejects(bad.models.list(), (e) => e instanceof OpenAI.AuthenticationError && e.status === 401);
  await assert.rejects(client.chat.completions.create({ model: 'gpt-4o', messages: [{ role: 'user', content: 'hi' }] }),
                       (e) => e instanceof OpenAI.NotFoundError && e.status === 404 && e.code === 'model_not_found');
  await assert.rejects(client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'hi' }], temperature: 5 }),
                       (e) => e instanceof OpenAI.BadRequestError && e.param === 'temperature');
  await assert.rejects(client.completions.create({ model: 'tiny', prompt: 'x', max_tokens: 100000 }),
                       (e) => e instanceof OpenAI.BadRequestError && e.code === 'context_length_exceeded');
  await assert.rejects(client.chat.completions.create({ model: 'tiny', messages: [{ role: 'oracle', content: 'hi' }] }),
                       (e) => e instanceof OpenAI.BadRequestError && /unknown role/.test(e.message));
});

server.kill('SIGTERM');
await new Promise((resolve) => server.on('exit', resolve));
fs.rmSync(dir, { recursive: true, force: true });
if (failures.length) {
  console.log(`${failures.length} failed: ${failures.join('; ')}`);
  process.exit(1);
}
console.log('all passed');
