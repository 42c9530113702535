// dsv3 tasks: verifiable arithmetic tasks (addition, multiplication, the countdown puzzle)
// with a held-out split, written as the files the post-training commands read: tasks for
// dsv3 grpo and dsv3 eval, conversations with worked answers for dsv3 sft, or plain text
// lines for pre-training with dsv3 data.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "eval/rewards.h"

namespace dsv3::cli {

namespace {

struct TasksFlags {
  std::string op = "add", split = "train", format = "tasks", out;
  int digits = 3;
  int64_t count = 1000;
  uint64_t seed = 1;
};

void run(const TasksFlags& f) {
  const auto tasks = arithmetic_tasks(f.op, f.digits, f.count, f.seed, f.split);
  std::ofstream out(f.out, std::ios::trunc);
  if (!out) fail("--out: cannot write ", f.out);
  for (const ArithmeticTask& t : tasks) {
    if (f.format == "tasks") {
      out << nlohmann::json{{"prompt", t.prompt}, {"answer", t.answer}}.dump() << "\n";
    } else if (f.format == "sft") {
      nlohmann::ordered_json conversation = {{"messages", nlohmann::ordered_json::array()}};
      conversation["messages"].push_back({{"role", "user"}, {"content", t.prompt}});
      conversation["messages"].push_back({{"role", "assistant"}, {"content", t.solution}});
      out << conversation.dump() << "\n";
    } else if (f.format == "text") {
      out << t.prompt << " " << t.solution << "\n";
    } else {
      out << t.equation << "\n";
    }
  }
  out.close();
  if (!out) fail(f.out, ": write failed");
  std::fprintf(stderr, "dsv3 tasks: %zu %s tasks (%s, %d digits, %s split) in %s\n", tasks.size(), f.format.c_str(), f.op.c_str(),
               f.digits, f.split.c_str(), f.out.c_str());
}

}  // namespace

void add_tasks(CLI::App& app) {
  auto f = std::make_shared<TasksFlags>();
  CLI::App* cmd = app.add_subcommand("tasks", "write verifiable arithmetic tasks for dsv3 grpo / eval / sft / data");
  cmd->add_option("--op", f->op, "add, mul or countdown (reach a target from 4 numbers)")
      ->check(CLI::IsMember({"add", "mul", "countdown"}))
      ->capture_default_str();
  cmd->add_option("--digits", f->digits, "digits of each number (countdown: at most)")->capture_default_str();
  cmd->add_option("--count", f->count, "tasks")->capture_default_str();
  cmd->add_option("--split", f->split, "train or heldout (a task is in one split only, whatever the seed)")
      ->check(CLI::IsMember({"train", "heldout"}))
      ->capture_default_str();
  cmd->add_option("--seed", f->seed, "seed of the draw")->capture_default_str();
  cmd->add_option("--format", f->format,
                  "tasks: {\"prompt\", \"answer\"} lines (dsv3 grpo, dsv3 eval); sft: conversations with a worked answer "
                  "ending in \"#### ANSWER\" (dsv3 sft); text: \"PROMPT WORKED-ANSWER\" lines; equation: \"347 + 285 = 632\" lines "
                  "(both for dsv3 data --txt-docs line)")
      ->check(CLI::IsMember({"tasks", "sft", "text", "equation"}))
      ->capture_default_str();
  cmd->add_option("--out,-o", f->out, "output file")->required();
  cmd->callback([f] { run(*f); });
}

}  // namespace dsv3::cli
