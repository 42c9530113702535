// The one error type of the library: an exception whose message names what is wrong
// (file, tensor, field). No exit() inside the library. Depends on std only.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace dsv3 {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// cat("tensor ", name, ": shape ", n) -> one string; keeps error sites short.
template <typename... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  throw Error(cat(parts...));
}

}  // namespace dsv3
