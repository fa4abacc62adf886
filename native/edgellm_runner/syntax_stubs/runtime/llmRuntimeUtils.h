// Syntax-check stub (see ../README.md): Edge-LLM 0.11.0 runtime/llmRuntimeUtils.h, the request and
// response fields the runner reads or sets (the real structs have many more).
#pragma once
#include "common/tensor.h"
#include "runtime/imageUtils.h"
#include <cstdint>
#include <string>
#include <vector>
namespace trt_edgellm
{
namespace rt
{
struct Message
{
    struct MessageContent
    {
        std::string type;
        std::string content;
    };
    std::string role;
    std::vector<MessageContent> contents;
};

struct LLMGenerationRequest
{
    struct FormattedRequest
    {
        std::string formattedSystemPrompt;
        std::string formattedCompleteRequest;
    };
    struct Request
    {
        std::vector<Message> messages;
        std::vector<rt::imageUtils::ImageData> imageBuffers;
        mutable FormattedRequest formatted;
    };
    std::vector<Request> requests;
    mutable std::vector<FormattedRequest> formattedRequests;
    std::vector<std::vector<int32_t>> preTokenizedInputIds;
    float temperature;
    float topP;
    int64_t topK;
    int64_t maxGenerateLength;
    bool applyChatTemplate{true};
    bool addGenerationPrompt{true};
    bool disableSpecDecode{false};
    int32_t acceptHiddenLayer{0};
};

struct LLMGenerationResponse
{
    std::vector<std::vector<int32_t>> outputIds;
    std::vector<std::string> outputTexts;
};
} // namespace rt
} // namespace trt_edgellm
