// dsv3: train, run and serve DeepSeek-V3-architecture models. Subcommands live in
// cmd_*.cpp; this file parses and reports errors (exit 1 with "dsv3: error: ...").
#include <CLI/CLI.hpp>
#include <cstdio>

#include "cli/commands.h"
#include "backend/ops.h"
#include "core/error.h"
#include "dist/communicator.h"

int main(int argc, char** argv) {
  dsv3::prepare_threads(argv);
  CLI::App app{"dsv3: a C++ engine for DeepSeek-V3-architecture models"};
  app.require_subcommand(1);
  dsv3::cli::add_generate(app);
  dsv3::cli::add_logits(app);
  dsv3::cli::add_tokenize(app);
  dsv3::cli::add_detokenize(app);
  dsv3::cli::add_template(app);
  dsv3::cli::add_data(app);
  dsv3::cli::add_train_tokenizer(app);
  dsv3::cli::add_grads(app);
  dsv3::cli::add_train(app);
  dsv3::cli::add_sft(app);
  dsv3::cli::add_grpo(app);
  dsv3::cli::add_tasks(app);
  dsv3::cli::add_cost(app);
  dsv3::cli::add_perplexity(app);
  dsv3::cli::add_export(app);
  dsv3::cli::add_serve(app);
  dsv3::cli::add_schedule(app);
  dsv3::cli::add_eval(app);
  dsv3::cli::add_plot(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const dsv3::Error& e) {
    // Under mpirun the job ends here: the other processes would wait for this one.
    dsv3::dist::fail_job(std::string("dsv3: error: ") + e.what(), 1);
    return 1;
  } catch (const std::exception& e) {
    dsv3::dist::fail_job(std::string("dsv3: internal error: ") + e.what(), 2);
    return 2;
  }
  return 0;
}
