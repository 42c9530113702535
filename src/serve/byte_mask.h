// What every byte-level token constraint does the same way (json_grammar.h, tool_calls.h):
// a grammar state that is fed bytes, a vocabulary whose tokens are byte strings. mask_tokens
// lowers every token whose bytes the state refuses (on a copy of it: `scratch`), every
// special token but those in `allowed`, and EOS unless `end`; the first byte's verdict is
// found once for all 256 bytes, so most tokens are refused without a walk. If nothing is
// left, the text can only end: dead_end is set and EOS allowed. accept_token feeds a chosen
// token to the state (a byte it refuses sets dead_end). Uses the tokenizer.
#pragma once
#include <algorithm>
#include <cstdint>
#include <string_view>
#include <vector>

#include "infer/constraint.h"
#include "tokenizer/tokenizer.h"

namespace dsv3::serve {

// feed(State&, uint8_t) -> bool: whether the state takes the byte.
template <typename State, typename Feed>
void mask_tokens(const Tokenizer& tok, const std::vector<int64_t>& eos, const std::vector<int32_t>& allowed, const State& state,
                 State& scratch, bool end, bool& dead_end, Feed feed, float* logits, int64_t vocab) {
  bool first[256];
  for (int b = 0; b < 256; ++b) {
    scratch = state;
    first[b] = feed(scratch, uint8_t(b));
  }
  end = end || dead_end;
  const int64_t known = tok.vocab_size();
  bool any = false;
  for (int64_t id = 0; id < vocab; ++id) {
    if (std::find(eos.begin(), eos.end(), id) != eos.end()) {
      if (!end) logits[id] = TokenConstraint::kMasked;
      any = any || end;
      continue;
    }
    const bool special = id < known && tok.is_special(int32_t(id)) &&
                         std::find(allowed.begin(), allowed.end(), int32_t(id)) == allowed.end();
    if (dead_end || id >= known || special) {
      logits[id] = TokenConstraint::kMasked;
      continue;
    }
    const std::string_view bytes = tok.token_bytes(int32_t(id));
    bool ok = !bytes.empty() && first[uint8_t(bytes[0])];
    if (ok && bytes.size() > 1) {
      scratch = state;
      for (char ch : bytes)
        if (!(ok = feed(scratch, uint8_t(ch)))) break;
    }
    if (!ok) logits[id] = TokenConstraint::kMasked;
    any = any || ok;
  }
  if (!any && !dead_end) {  // no token continues the text: it can only end, reported cut short
    dead_end = true;
    for (int64_t id : eos)
      if (id < vocab) logits[id] = 0;
  }
}

template <typename State, typename Feed>
void accept_token(const Tokenizer& tok, const std::vector<int64_t>& eos, int32_t token, State& state, bool& dead_end, Feed feed) {
  if (std::find(eos.begin(), eos.end(), int64_t(token)) != eos.end() || token >= tok.vocab_size()) return;
  for (char ch : tok.token_bytes(token))
    if (!feed(state, uint8_t(ch))) dead_end = true;
}

}  // namespace dsv3::serve
