// `dsv3 eval` (the post-training issue, item 4): a model scored on a task file, each line one
// JSON object of one of three kinds (the kind of the first line is the file's):
//   {"context": "...", "choices": ["...", ...], "answer": i}   multiple choice by log-likelihood
//   {"prompt": "...", "answer": "...", "stop": ["..."]}        generation, exact match
//   {"text": "..."}                                            perplexity
// Multiple choice reports acc (the choice of highest log-likelihood of its tokens after the
// context, paired as the harness pairs them: the context's trailing spaces moved to the
// choice, context + choice encoded whole), acc_norm (log-likelihood divided by the choice's length in characters) and
// acc_bytes (in bytes), as EleutherAI's lm-evaluation-harness reports them, each with the
// standard error of a mean (sample standard deviation / sqrt(n)). Generation decodes greedily
// (or samples n answers per prompt) until the earliest stop string, EOS or max_tokens,
// compares the stripped text with the stripped answer (or, with a reward, asks that verifier:
// `exact` reads the final answer after "####" or in \boxed{}), and reports exact_match (of
// the first answer) and pass@k with the
// unbiased estimator 1 - C(n-c, k) / C(n, k). Perplexity pools every text's next-token
// losses; its standard error comes from a seeded bootstrap over the texts. A standard error
// that is undefined (one item) is NaN (JSON null, "n/a" printed).
// Uses infer (generation), tokenizer and model.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/transformer.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_config.h"

namespace dsv3 {

struct EvalOptions {
  int64_t max_tokens = 64;     // generation
  int64_t samples = 1;         // answers per prompt (pass@k needs k <= samples)
  float temperature = 0;       // 0: greedy (then every sample is the same)
  std::vector<int64_t> k = {1};
  uint64_t seed = 0;
  int64_t bootstrap = 1000;    // perplexity's resamples
  int64_t limit = 0;           // items scored (0: all)
  bool bos = true;             // BOS first as tokenizer_config.json asks (the harness adds none by default)
  bool chat = false;           // generation: the prompt is a user message in the chat template (assistant turn opened)
  std::string reward;          // generation: scored by this verifier (rewards.h: correct when it gives 1), not text equality
  std::function<void(int64_t items)> on_item;  // after each item scored (progress)
};

struct EvalMetric {
  std::string name;
  double value = 0, stderr_ = 0;
};

struct EvalReport {
  std::string kind;  // "multiple_choice", "generation" or "perplexity"
  int64_t items = 0;
  std::vector<EvalMetric> metrics;
};

// Scores the task file; Error naming the file and line for a malformed or mixed line.
EvalReport evaluate(Transformer& model, const Tokenizer& tok, const TokenizerConfig* config, const std::string& task_path,
                    const EvalOptions& opt);

// The pieces, for tests and reuse:
// log p(continuation | context) summed over the continuation's tokens (context non-empty).
double continuation_loglik(Transformer& model, const std::vector<int32_t>& context, const std::vector<int32_t>& continuation);
// The unbiased pass@k of n samples of which c are correct (k <= n).
double pass_at_k(int64_t n, int64_t c, int64_t k);
// Mean and its standard error (sample standard deviation / sqrt(n); 0 for one value).
EvalMetric mean_with_stderr(const std::string& name, const std::vector<double>& values);

}  // namespace dsv3
