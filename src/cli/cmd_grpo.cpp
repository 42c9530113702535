// dsv3 grpo: reinforcement learning of a checkpoint on verifiable tasks with Group Relative
// Policy Optimization (DeepSeekMath §4.1, DeepSeek-V3 §5.2.2): groups of sampled answers
// per prompt, rule-based rewards, the clipped objective with a KL penalty to the starting
// checkpoint. Progress, metrics.csv, reward / KL / length plots, held-out accuracy and
// checkpoints with resume, as dsv3 train.
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <memory>

#include "cli/args.h"
#include "cli/commands.h"
#include "cli/training_run.h"
#include "core/error.h"
#include "eval/eval.h"
#include "posttrain/grpo_trainer.h"
#include "train/plot.h"

namespace dsv3::cli {

namespace {

struct GrpoFlags : TrainingFlags {
  std::string model, tasks, eval_tasks;
  int64_t eval_limit = 200;
  GrpoOptions grpo;
  double clip_high = -1;  // -1: --clip
};

void run(GrpoFlags& f) {
  apply_training_flags(f);
  TrainOptions& o = f.opt;
  GrpoOptions& g = f.grpo;
  o.mtp_weight = 0, o.alpha = 0;  // the objective is GRPO's alone
  o.seq = 1;                      // unused: the lengths come from the prompts and answers
  g.prompts = o.batch, g.seed = o.seed;
  g.loss.clip_high = f.clip_high < 0 ? g.loss.clip_low : f.clip_high;
  check_grpo_options(g);  // before anything is read or written
  // Samples reused over --updates steps are not saved: checkpoints fall between batches, so a
  // resumed run draws what the whole run would have.
  if (g.updates > 1 && (o.steps % g.updates != 0 || (o.save_every > 0 && o.save_every % g.updates != 0)))
    fail("--updates ", g.updates, " needs --steps and --save-every multiples of it (checkpoints between batches of samples)");
  const std::string config_json = fine_tuning_config(f.model, "GRPO reads and writes text");
  const ModelConfig c = ModelConfig::parse(config_json, f.model + "/config.json");
  const Tokenizer tok(f.model + "/tokenizer.json");
  const TokenizerConfig chat = load_tokenizer_config(f.model + "/tokenizer_config.json");
  auto tasks = std::make_unique<GrpoTasks>(read_grpo_tasks(f.tasks), o.seed);
  GrpoTasks& task_order = *tasks;
  if (!f.eval_tasks.empty()) read_grpo_tasks(f.eval_tasks);  // malformed held-out tasks fail now, not at the first evaluation

  // The reference: the starting checkpoint in float32, frozen.
  ModelWeights reference = allocate_weights(c, DType::f32, MtpTying::tied);
  load_float_weights(f.model, c, reference);
  add_tokenizer_files(f.model, "--model", o.extras);
  lock_run_folder(f.out);
  Trainer trainer(config_json, o, std::move(tasks), nullptr, f.out);
  const bool resumed = f.resume && trainer.resume();
  refuse_overwrite(f.out, resumed);
  if (f.resume && !resumed) std::fprintf(stderr, "no checkpoint in %s: starting from %s\n", f.out.c_str(), f.model.c_str());
  if (!resumed) trainer.init_from(f.model);
  GrpoTrainer grpo(trainer, task_order, tok, chat, reference, g);
  std::fprintf(stderr,
               "dsv3 grpo: %s, %ld tasks, %ld steps of %ld prompts x %ld answers (up to %ld tokens), reward %s, clip "
               "[%g, %g], KL %g, %s-normalised loss%s%s\n",
               f.model.c_str(), long(task_order.size()), long(o.steps), long(g.prompts), long(g.group),
               long(g.max_new_tokens), g.reward.c_str(), 1 - g.loss.clip_low, 1 + g.loss.clip_high, g.loss.beta,
               g.loss.loss_norm.c_str(), g.loss.no_std ? ", advantages not divided by the std" : "",
               resumed ? cat(", resumed at step ", trainer.state().step).c_str() : "");

  // Held-out accuracy: greedy answers to the first eval_limit held-out tasks, scored by the reward.
  EvalOptions eval;
  eval.max_tokens = g.max_new_tokens, eval.chat = true, eval.reward = g.reward, eval.limit = f.eval_limit;
  auto heldout = [&]() -> EvalMetric {
    if (f.eval_tasks.empty()) return {"", -1, 0};
    return evaluate(grpo.policy(), tok, &chat, f.eval_tasks, eval).metrics.at(0);
  };
  MetricsCsv csv(f.out + "/metrics.csv",
                 "step,samples,reward,informative,kl,clipped,length,loss,lr,grad_norm,heldout,heldout_stderr,sample_s,elapsed_s,"
                 "max_logp_gap",
                 resumed, trainer.state().step);
  Curve reward{"mean reward (smoothed)", "#1f77b4", {}, {}}, held{"held-out accuracy (greedy)", "#d62728", {}, {}};
  Curve kl{"KL to the reference", "#2ca02c", {}, {}}, length{"answer length (tokens)", "#9467bd", {}, {}};
  double smooth = -1;
  auto add_points = [&](double step, double r, double k, double len, const std::string& h, const std::string& se) {
    smooth = smooth < 0 ? r : 0.9 * smooth + 0.1 * r;
    reward.points.push_back({step, smooth});
    kl.points.push_back({step, k});
    length.points.push_back({step, len});
    if (!h.empty()) {
      const double v = std::atof(h.c_str()), e = std::atof(se.c_str());
      held.points.push_back({step, v});
      held.band.push_back({v - e, v + e});
    }
  };
  auto plot = [&] {
    write_svg_plot(f.out + "/reward.svg", "dsv3 grpo: reward and held-out accuracy", {reward, held});
    write_svg_plot(f.out + "/kl.svg", "dsv3 grpo: KL to the reference", {kl});
    write_svg_plot(f.out + "/length.svg", "dsv3 grpo: answer length", {length});
  };
  for (const auto& cols : csv.kept()) {
    if (cols.size() < 12) continue;
    if (cols[2].empty()) {  // the step-0 row: the held-out accuracy alone
      if (!cols[10].empty()) {
        const double v = std::atof(cols[10].c_str()), e = std::atof(cols[11].c_str());
        held.points.push_back({0, v});
        held.band.push_back({v - e, v + e});
      }
      continue;
    }
    add_points(std::atof(cols[0].c_str()), std::atof(cols[2].c_str()), std::atof(cols[4].c_str()), std::atof(cols[6].c_str()),
               cols[10], cols[11]);
  }
  if (!resumed && !f.eval_tasks.empty()) {  // where the policy starts
    const EvalMetric h = heldout();
    std::fprintf(stderr, "held-out accuracy at step 0: %.4f ± %.4f\n", h.value, h.stderr_);
    csv.write(cat("0,0,,,,,,,,,", h.value, ",", h.stderr_, ",,,"));
    held.points.push_back({0, h.value});
    held.band.push_back({h.value - h.stderr_, h.value + h.stderr_});
  }
  ProgressLine progress(trainer.state().step, o.steps, o.log_every);
  trainer.run(
      [&](const StepMetrics& m) {
        const GrpoStepStats& s = grpo.stats();
        const bool evaluate_now = !f.eval_tasks.empty() && o.eval_every > 0 && (m.step % o.eval_every == 0 || m.step == o.steps);
        const EvalMetric h = evaluate_now ? heldout() : EvalMetric{"", -1, 0};
        const std::string hv = evaluate_now ? cat(h.value) : "", hs = evaluate_now ? cat(h.stderr_) : "";
        char line[512];
        std::snprintf(line, sizeof(line), "%ld,%ld,%.6f,%.4f,%.6g,%.4f,%.2f,%.6g,%.6g,%.4f,%s,%s,%.3f,%.3f,%.3g", long(m.step),
                      long(s.samples), s.reward, s.informative, s.kl, s.clipped, s.length, m.loss, m.lr, m.grad_norm,
                      hv.c_str(), hs.c_str(), s.sample_seconds, progress.elapsed(), s.max_logp_gap);
        csv.write(line);
        add_points(double(m.step), s.reward, s.kl, s.length, hv, hs);
        std::snprintf(line, sizeof(line), "reward %.3f%s | kl %.4f | len %.1f | clipped %.3f | lr %.2e | gnorm %.2f | sample %.1fs",
                      smooth, evaluate_now ? cat(" held-out ", std::to_string(h.value).substr(0, 5)).c_str() : "", s.kl,
                      s.length, s.clipped, m.lr, m.grad_norm, s.sample_seconds);
        progress.show(m.step, line, evaluate_now);
        if (evaluate_now || m.step == o.steps || m.step % 10 == 0) plot();
      },
      [&](StepMetrics& m) { return grpo.objective(m); });
  plot();
  const auto last = latest_checkpoint(f.out);
  std::fprintf(stderr, "done: %ld steps in %s; checkpoint %s; metrics %s/metrics.csv, plots %s/{reward,kl,length}.svg\n",
               long(trainer.state().step), format_duration(progress.elapsed()).c_str(), last ? last->c_str() : "(none)",
               f.out.c_str(), f.out.c_str());
}

}  // namespace

void add_grpo(CLI::App& app) {
  auto f = std::make_shared<GrpoFlags>();
  // RL defaults: a low constant rate after a short warmup.
  f->opt.steps = 200, f->opt.batch = 8, f->opt.schedule.lr = 1e-5, f->opt.schedule.min_lr = 1e-5, f->opt.eval_every = 20;
  f->opt.save_every = 50;
  CLI::App* cmd = app.add_subcommand("grpo", "Reinforcement learning on verifiable tasks with GRPO (groups of sampled answers, rule-based rewards)");
  cmd->add_option("--model,-m", f->model, "the starting checkpoint (and the KL reference), with tokenizer and chat template")->required();
  cmd->add_option("--tasks", f->tasks, "JSONL tasks: {\"prompt\": ..., \"answer\": ...} per line (dsv3 tasks writes them)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--eval-tasks", f->eval_tasks, "held-out tasks, same format: greedy accuracy every --eval-every steps")
      ->check(CLI::ExistingFile);
  cmd->add_option("--eval-limit", f->eval_limit, "held-out tasks scored per evaluation (0: all)")->capture_default_str();
  GrpoOptions& g = f->grpo;
  cmd->add_option("--reward", g.reward, "verifier: exact (final answer after #### or in \\boxed{}), format, countdown")->capture_default_str();
  cmd->add_option("--group", g.group, "G: answers sampled per prompt (>= 2)")->capture_default_str();
  cmd->add_option("--max-new-tokens", g.max_new_tokens, "tokens per answer at most")->capture_default_str();
  cmd->add_option("--temperature", g.temperature, "sampling temperature (1: the policy itself)")->capture_default_str();
  cmd->add_option("--updates", g.updates, "optimizer steps per batch of samples (DeepSeekMath's mu)")->capture_default_str();
  cmd->add_option("--clip", g.loss.clip_low, "epsilon: the ratio is clipped to [1 - eps, 1 + eps]")->capture_default_str();
  cmd->add_option("--clip-high", f->clip_high, "upper epsilon when it differs (DAPO; default --clip)");
  cmd->add_option("--kl", g.loss.beta, "beta: weight of the KL penalty to the reference (DeepSeekMath: 0.04)")->capture_default_str();
  cmd->add_option("--loss-norm", g.loss.loss_norm, "seq: mean over each answer's tokens, then the group (DeepSeekMath); token: over all the group's tokens (DAPO)")
      ->check(CLI::IsMember({"seq", "token"}))
      ->capture_default_str();
  cmd->add_flag("--no-std", g.loss.no_std, "advantages r - mean(r), not divided by the std (Dr. GRPO)");
  add_training_flags(cmd, *f, RunKind::grpo);
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
