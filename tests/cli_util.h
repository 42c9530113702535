// Runs the built dsv3 program (DSV3_BINARY) as an outside checker does, for the CLI tests.
#pragma once
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <string>

namespace dsv3::test {

struct CliResult {
  int status;       // exit status (-1: killed)
  std::string out;  // stdout, and stderr too unless with_stderr is false
};

inline CliResult run(const std::string& args, bool with_stderr = true) {
  const std::string cmd = std::string(DSV3_BINARY) + " " + args + (with_stderr ? " 2>&1" : " 2>/dev/null");
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  std::array<char, 4096> buf{};
  while (size_t n = fread(buf.data(), 1, buf.size(), p)) out.append(buf.data(), n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}

}  // namespace dsv3::test
