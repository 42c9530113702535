// GRPO steps (see grpo_trainer.h).
#include "posttrain/grpo_trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "eval/rewards.h"
#include "tokenizer/chat_template.h"

namespace dsv3 {

std::vector<GrpoTask> read_grpo_tasks(const std::string& path) {
  std::ifstream in(path);
  if (!in) fail(path, ": cannot read");
  std::vector<GrpoTask> tasks;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string at = path + " line " + std::to_string(n);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      fail(at, ": not JSON (", e.what(), ")");
    }
    if (!j.is_object()) fail(at, ": expected {\"prompt\": string, \"answer\": string}");
    for (const char* key : {"prompt", "answer"})
      if (!j.contains(key) || !j[key].is_string())
        fail(at, ": the task has no \"", key, "\" string (expected {\"prompt\": string, \"answer\": string})");
    tasks.push_back({j["prompt"], j["answer"]});
    if (tasks.back().prompt.empty()) fail(at, ": the prompt is empty");
  }
  if (tasks.empty()) fail(path, ": no tasks");
  return tasks;
}

void check_grpo_options(const GrpoOptions& opt) {
  if (opt.group < 2) fail("--group must be >= 2: GRPO's baseline is the other answers to the same prompt, not ", opt.group);
  if (opt.prompts < 1) fail("--prompts must be >= 1, not ", opt.prompts);
  if (opt.max_new_tokens < 1) fail("--max-new-tokens must be >= 1, not ", opt.max_new_tokens);
  if (opt.updates < 1) fail("--updates must be >= 1, not ", opt.updates);
  if (!(opt.temperature > 0)) fail("--temperature must be > 0: GRPO samples its groups");
  if (opt.loss.clip_low < 0 || opt.loss.clip_high < 0) fail("--clip and --clip-high must be >= 0");
  if (opt.loss.beta < 0) fail("--kl must be >= 0, not ", opt.loss.beta);
  if (opt.loss.loss_norm != "seq" && opt.loss.loss_norm != "token") fail("--loss-norm must be seq or token, not ", opt.loss.loss_norm);
  check_reward_name(opt.reward);
}

GrpoTrainer::GrpoTrainer(Trainer& trainer, GrpoTasks& tasks, const Tokenizer& tok, const TokenizerConfig& chat,
                         const ModelWeights& reference, const GrpoOptions& opt)
    : trainer_(trainer),
      tasks_(tasks),
      tok_(tok),
      chat_(chat),
      reference_(reference),
      opt_(opt),
      policy_(trainer.config(), trainer.params()),
      // The reference in the policy's precision: the same weights give the same log-probabilities.
      ref_pass_(trainer.config(), {0, 0, trainer.pass().loss().linear}) {
  check_grpo_options(opt_);
  if (!chat_.chat_template) fail("GRPO renders prompts with the checkpoint's chat template, and tokenizer_config.json has none");
  // Room for the longest prompt of the task file and its answer, every answer of a step at once.
  // Every prompt rendered and encoded once.
  int64_t longest = 0;
  for (size_t i = 0; i < tasks_.all().size(); ++i) {
    const GrpoTask& t = tasks_.all()[i];
    prompts_.push_back(tok_.encode(user_turn(chat_, t.prompt)));
    longest = std::max<int64_t>(longest, int64_t(prompts_.back().size()));
    try {  // a reference the verifier cannot read fails now, not when its task comes up
      reward(opt_.reward, "", t.answer);
    } catch (const std::exception& e) {
      fail("task ", i + 1, ": its answer '", t.answer, "' is not a reference the ", opt_.reward, " reward reads (", e.what(), ")");
    }
  }
  const int64_t max_len = longest + opt_.max_new_tokens;
  if (max_len > trainer.config().max_position_embeddings)
    fail("the longest prompt (", longest, " tokens) and --max-new-tokens ", opt_.max_new_tokens, " exceed the model's ",
         trainer.config().max_position_embeddings, " positions");
  const int64_t sequences = opt_.prompts * opt_.group;
  engine_ = std::make_unique<BatchEngine>(policy_, sequences, max_len, std::max<int64_t>(512, sequences));
}

void GrpoTrainer::sample_groups(int64_t batch) {
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t G = opt_.group;
  samples_.assign(size_t(opt_.prompts * G), {});
  std::vector<int64_t> ids(samples_.size());
  std::vector<std::string> answers(size_t(opt_.prompts));
  GenerateOptions g;
  g.max_tokens = opt_.max_new_tokens;
  g.sampling.temperature = opt_.temperature;
  g.logprobs = 0;  // the chosen token's log-probability, as drawn
  auto seed = [&](int64_t p, int64_t i) {  // one stream per answer, from the run's seed and the batch
    return opt_.seed * 0x9e3779b97f4a7c15ULL + uint64_t(batch) * 1000003ULL + uint64_t(p * G + i) + 1;
  };
  for (int64_t p = 0; p < opt_.prompts; ++p) {
    const int64_t task = tasks_.next();
    answers[size_t(p)] = tasks_.all()[size_t(task)].answer;
    const std::vector<int32_t>& prompt = prompts_[size_t(task)];
    for (int64_t i = 0; i < G; ++i) samples_[size_t(p * G + i)].prompt_len = int64_t(prompt.size());
    g.sampling.seed = seed(p, 0);
    const int64_t first = engine_->add(prompt, g);
    if (first < 0) fail("GRPO: the batch engine has no room for the step's samples");
    ids[size_t(p * G)] = first;
    for (int64_t i = 1; i < G; ++i) {  // the group's other answers share the prompt's pass
      g.sampling.seed = seed(p, i);
      ids[size_t(p * G + i)] = engine_->add_sibling(first, g);
      if (ids[size_t(p * G + i)] < 0) fail("GRPO: the batch engine has no room for the step's samples");
    }
  }
  while (engine_->step()) {
  }
  for (size_t k = 0; k < samples_.size(); ++k) {
    const BatchEngine::Sequence& s = engine_->sequence(ids[k]);
    Sample& out = samples_[k];
    out.tokens = s.prompt;
    out.tokens.insert(out.tokens.end(), s.tokens.begin(), s.tokens.end());
    for (const TokenLogprobs& lp : s.logprobs) out.old_logp.push_back(lp.logprob);
    out.reward = reward(opt_.reward, tok_.decode(s.tokens, true), answers[k / size_t(G)]);
    engine_->forget(ids[k]);
  }
  stats_.sample_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double GrpoTrainer::objective(StepMetrics& m) {
  const int64_t step = trainer_.state().step + 1;
  const bool fresh = samples_.empty() || (step - 1) % opt_.updates == 0;
  stats_ = {};
  // The batch's number seeds its samples: a resumed run draws what the whole run would have.
  if (fresh) sample_groups((step - 1) / opt_.updates);
  // One training sequence per answer: the prompt and the answer but its last token as
  // inputs, the answer's tokens as the only targets; padded to the longest.
  const int64_t B = int64_t(samples_.size()), G = opt_.group, P = opt_.prompts, V = trainer_.config().vocab_size;
  int64_t S = 0, tokens = 0;
  for (const Sample& s : samples_) S = std::max<int64_t>(S, int64_t(s.tokens.size()) - 1), tokens += int64_t(s.tokens.size());
  const int32_t pad = trainer_.config().eos_token_ids.empty() ? 0 : int32_t(trainer_.config().eos_token_ids[0]);
  inputs_.assign(size_t(B * S), std::clamp<int32_t>(pad, 0, int32_t(V - 1)));
  targets_.assign(size_t(B * S), -1);
  for (int64_t b = 0; b < B; ++b) {
    const Sample& s = samples_[size_t(b)];
    std::copy(s.tokens.begin(), s.tokens.end() - 1, inputs_.begin() + b * S);
    for (size_t j = size_t(s.prompt_len); j < s.tokens.size(); ++j) targets_[size_t(b * S) + j - 1] = s.tokens[j];
  }
  TrainingPass<float>& pass = trainer_.pass();
  lengths_.resize(size_t(B));
  for (int64_t b = 0; b < B; ++b) lengths_[size_t(b)] = int64_t(samples_[size_t(b)].tokens.size()) - 1;
  pass.forward(trainer_.params(), inputs_.data(), targets_.data(), B, S, lengths_.data());
  const std::vector<double>& logp = pass.token_logprobs();
  std::vector<double> ref_logp;
  if (opt_.loss.beta != 0) {
    ref_pass_.forward(reference_, inputs_.data(), targets_.data(), B, S, lengths_.data());
    ref_logp = ref_pass_.token_logprobs();
  }
  // The loss of each group, averaged over the groups; each token's weight is minus the
  // loss's derivative with respect to its log-probability.
  weights_.assign(size_t(B * S), 0.0);
  double loss = 0, reward_sum = 0, length = 0;
  for (int64_t p = 0; p < P; ++p) {
    std::vector<GrpoOutput> outputs(static_cast<size_t>(G));
    std::vector<double> rewards(static_cast<size_t>(G));
    for (int64_t i = 0; i < G; ++i) {
      const int64_t b = p * G + i;
      const Sample& s = samples_[size_t(b)];
      GrpoOutput& o = outputs[size_t(i)];
      for (size_t j = size_t(s.prompt_len); j < s.tokens.size(); ++j) {
        const size_t at = size_t(b * S) + j - 1;
        o.logp.push_back(logp[at]);
        o.ref_logp.push_back(ref_logp.empty() ? logp[at] : ref_logp[at]);
        if (fresh) stats_.max_logp_gap = std::max(stats_.max_logp_gap, std::abs(logp[at] - s.old_logp[j - size_t(s.prompt_len)]));
      }
      o.old_logp = s.old_logp;
      rewards[size_t(i)] = s.reward;
      reward_sum += s.reward;
      length += double(o.logp.size());
    }
    const GrpoLoss l = grpo_loss(outputs, group_advantages(rewards, opt_.loss), opt_.loss);
    loss += l.loss / double(P);
    stats_.kl += l.kl / double(P), stats_.clipped += l.clipped_fraction / double(P);
    const auto [lo, hi] = std::minmax_element(rewards.begin(), rewards.end());
    stats_.informative += double(*lo != *hi) / double(P);
    for (int64_t i = 0; i < G; ++i) {
      const int64_t b = p * G + i;
      const Sample& s = samples_[size_t(b)];
      for (size_t j = size_t(s.prompt_len); j < s.tokens.size(); ++j)
        weights_[size_t(b * S) + j - 1] = -l.dlogp[size_t(i)][j - size_t(s.prompt_len)] / double(P);
    }
  }
  pass.weigh_tokens(weights_.data());
  pass.backward(trainer_.params(), trainer_.grads());
  stats_.samples = B;
  stats_.reward = reward_sum / double(B);
  stats_.length = length / double(B);
  m.loss = loss, m.mtp_loss = 0;
  m.activation_bytes = pass.activation_bytes();
  m.batch = B, m.tokens = tokens;
  return loss;
}

}  // namespace dsv3
