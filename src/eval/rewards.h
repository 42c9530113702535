// Rule-based rewards for verifiable answers (the post-training issue, item 3; DeepSeek-V3
// §5.2.1): the final answer is read from the text as GSM8K writes it ("#### 42") or as
// LaTeX does ("\boxed{42}"), the last one if several, and compared after normalisation
// (spaces, thousands separators, a leading "+" or "$", a trailing "." or ".0", numbers in a
// canonical form). Also a generator of verifiable arithmetic tasks (multi-digit addition and
// multiplication, and the countdown puzzle: reach a target from given numbers) with a held-out
// split that never overlaps the training one. Uses nothing else.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace dsv3 {

// The final answer a text gives, if any.
std::optional<std::string> extract_answer(const std::string& text);
// The canonical form of an answer (a number as the shortest exact decimal; else trimmed text).
std::string normalize_answer(const std::string& answer);
// 1 if the text's final answer equals the reference (both normalised), else 0.
double exact_match_reward(const std::string& text, const std::string& reference);
// 1 if the text gives a final answer in one of the two forms, else 0.
double format_reward(const std::string& text);
// The countdown puzzle's check: the text's final answer is an arithmetic expression (+ - * /,
// parentheses, integers) using each given number at most once that equals the target
// exactly (rational arithmetic). reference: "TARGET: N1 N2 ...". 1 or 0.
double countdown_reward(const std::string& text, const std::string& reference);
// A reward by name ("exact", "format", "countdown"); Error naming the unknown ones.
double reward(const std::string& name, const std::string& text, const std::string& reference);
// Error unless name is one of the rewards above.
void check_reward_name(const std::string& name);

struct ArithmeticTask {
  std::string prompt, answer;
  // A worked answer ending in "#### ANSWER", for SFT: addition column by column from the
  // units, each column's carry added in ("7+5=12, 4+8+1=13, 3+2+1=6. #### 632");
  // multiplication states the answer alone, countdown an expression that reaches the target.
  std::string solution;
  std::string equation;  // the fact alone, for pre-training text: "347 + 285 = 632", "((41*92)+52)+16 = 3840"
};
// count tasks of op ("add" or "mul") on numbers of `digits` digits, or "countdown" (reach a
// target from 4 numbers of 1..`digits` digits; its answer is countdown_reward's reference),
// drawn from seed; split "train" or "heldout" (a task belongs to one split only, by a hash of
// its numbers).
std::vector<ArithmeticTask> arithmetic_tasks(const std::string& op, int digits, int64_t count, uint64_t seed,
                                             const std::string& split);

}  // namespace dsv3
