// Text generation: prefill the prompt into the latent KV cache, then decode one token per
// forward pass until EOS or max_tokens. Uses model and sampler.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "infer/sampler.h"
#include "model/transformer.h"

namespace dsv3 {

struct GenerateOptions {
  int64_t max_tokens = 128;
  SamplingParams sampling;
  bool stop_at_eos = true;
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated, EOS included if it was produced
  bool stopped_at_eos = false;
  double prefill_seconds = 0, decode_seconds = 0;
  int64_t decode_steps = 0;  // forward passes after the prefill
};

// on_token is called with each generated token as soon as it is chosen.
GenerateResult generate(Transformer& model, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                        const std::function<void(int32_t)>& on_token = {});

}  // namespace dsv3
