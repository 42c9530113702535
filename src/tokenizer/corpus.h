// Streaming corpus reading for the BPE trainer and the data pipeline: .txt and .jsonl files
// (each optionally .gz), or folders of them, as a sequence of documents delivered in chunks,
// so a corpus never has to fit in memory. A .jsonl line is one document (its "text" field);
// a .txt file is one document, or with TxtDocs::line each non-empty line is one.
// Long documents are cut only where tokenization cannot change: after a '\n' that is
// followed by a printable non-space ASCII character (no pre-tokenizer piece, BPE merge or
// added token crosses such a point), so encoding chunk by chunk gives the ids of encoding
// the whole text. Depends on core and zlib.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace dsv3 {

enum class TxtDocs { file, line };

struct CorpusOptions {
  TxtDocs txt_docs = TxtDocs::file;
  size_t chunk_bytes = 64 * 1024;  // aim for chunks about this long
};

// Expands inputs: files are kept (any extension accepted only if it is .txt, .jsonl, .txt.gz
// or .jsonl.gz); folders are searched recursively for such files, in sorted order. Throws
// Error for a missing path, an unsupported file or a folder with no corpus files.
std::vector<std::string> corpus_files(const std::vector<std::string>& inputs);

class CorpusReader {
 public:
  CorpusReader(const std::vector<std::string>& inputs, CorpusOptions options = {});
  ~CorpusReader();
  CorpusReader(const CorpusReader&) = delete;
  CorpusReader& operator=(const CorpusReader&) = delete;

  // The next chunk of text: `doc_end` tells whether it ends its document. Returns false at
  // the end of the corpus. An empty document yields nothing.
  bool next(std::string& text, bool& doc_end);

  // Positions count decompressed file bytes (JSON syntax included for .jsonl).
  // position(): bytes of all inputs consumed up to the end of the last chunk delivered.
  uint64_t position() const;
  // The inputs' decompressed size: plain file sizes plus, for .gz, the size in the gzip
  // trailer (exact below 4 GiB for single-member files; an estimate otherwise).
  uint64_t total_size() const { return total_size_; }
  uint64_t text_bytes() const { return text_bytes_; }  // bytes of text delivered so far
  const std::vector<std::string>& files() const { return files_; }
  const std::string& current_file() const;

 private:
  struct Source;
  bool open_next_file();
  bool next_line(std::string& line);  // false at the end of the current file
  bool fill();                        // reads more of the current file into buf_

  std::vector<std::string> files_;
  CorpusOptions options_;
  size_t file_index_ = 0;  // index of the next file to open
  std::unique_ptr<Source> source_;
  std::string buf_;        // read but not yet delivered
  size_t buf_pos_ = 0;
  bool eof_ = true;
  uint64_t line_no_ = 0;
  uint64_t done_size_ = 0;   // decompressed sizes of the files already finished
  uint64_t file_read_ = 0;   // decompressed bytes read from the current file
  uint64_t total_size_ = 0;
  uint64_t text_bytes_ = 0;
};

// Where a chunk of a document can be cut without changing its tokenization: the largest
// position p <= limit with text[p - 1] == '\n' and text[p] printable non-space ASCII, or 0.
size_t safe_cut(std::string_view text, size_t limit);

}  // namespace dsv3
