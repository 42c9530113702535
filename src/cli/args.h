// Helpers shared by the subcommands: token-id lists from flags, thread settings.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dsv3::cli {

// "1 2 3", "1,2,3" or "[1, 2, 3]" -> ids; `flag` names the option in errors.
std::vector<int32_t> parse_ids(const std::string& text, const std::string& flag);
std::string ids_json(const std::vector<int32_t>& ids);  // "[1, 2, 3]"
void set_threads(int threads);                          // 0 keeps the default (all cores)
std::string format_duration(double seconds);            // "MM:SS" or "H:MM:SS", for ETAs

}  // namespace dsv3::cli
