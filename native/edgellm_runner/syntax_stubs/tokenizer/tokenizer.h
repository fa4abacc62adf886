// Syntax-check stub (see ../README.md): Edge-LLM 0.11.0 tokenizer/tokenizer.h (subset).
#pragma once
#include <cstdint>
#include <string>
#include <vector>
namespace trt_edgellm
{
namespace tokenizer
{
using Rank = std::int32_t;
class Tokenizer
{
public:
    std::vector<Rank> encode(std::string const& text, bool addBos = false, bool addEos = false) const;
};
} // namespace tokenizer
} // namespace trt_edgellm
