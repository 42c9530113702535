// The dsv3 subcommands; each registers its flags and its action on the CLI11 app.
#pragma once

namespace CLI {
class App;
}

namespace dsv3::cli {

void add_generate(CLI::App& app);
void add_logits(CLI::App& app);
void add_tokenize(CLI::App& app);
void add_detokenize(CLI::App& app);
void add_template(CLI::App& app);
void add_data(CLI::App& app);
void add_train_tokenizer(CLI::App& app);
void add_grads(CLI::App& app);
void add_train(CLI::App& app);
void add_sft(CLI::App& app);
void add_grpo(CLI::App& app);
void add_tasks(CLI::App& app);
void add_cost(CLI::App& app);
void add_plot(CLI::App& app);
void add_perplexity(CLI::App& app);
void add_export(CLI::App& app);
void add_serve(CLI::App& app);
void add_schedule(CLI::App& app);
void add_eval(CLI::App& app);

}  // namespace dsv3::cli
