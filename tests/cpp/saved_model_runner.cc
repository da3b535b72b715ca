// Loads a SavedModel through TensorFlow's C++ loader (LoadSavedModel, the code path TF
// Serving uses) and runs one signature with Session::Run on each request given.
//
// Usage: saved_model_runner <export_dir> <signature_name> <case_dir>...
// Each case dir holds `in/<key>.pb`, a serialized TensorProto per signature input. The runner
// writes every signature output `key` to `out/<key>.pb`, or, when Session::Run fails, the
// status to `error.txt`. The exit status is non-zero only when the model cannot be loaded.
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "tensorflow/cc/saved_model/loader.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor.pb.h"
#include "tensorflow/core/public/session.h"

namespace {

bool ReadFile(const std::string& path, std::string* contents) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return false;
  std::stringstream buffer;
  buffer << file.rdbuf();
  *contents = buffer.str();
  return true;
}

bool WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream file(path, std::ios::binary);
  file << contents;
  return static_cast<bool>(file);
}

// Runs one case; returns the error to report, or "" on success.
std::string RunCase(const tensorflow::SavedModelBundle& bundle,
                    const tensorflow::SignatureDef& signature, const std::string& case_dir) {
  std::vector<std::pair<std::string, tensorflow::Tensor>> feeds;
  for (const auto& [key, info] : signature.inputs()) {
    std::string serialized;
    if (!ReadFile(case_dir + "/in/" + key + ".pb", &serialized)) {
      return "missing input file for " + key;
    }
    tensorflow::TensorProto proto;
    tensorflow::Tensor tensor;
    if (!proto.ParseFromString(serialized) || !tensor.FromProto(proto)) {
      return "cannot parse the TensorProto of " + key;
    }
    feeds.emplace_back(info.name(), tensor);
  }
  std::vector<std::string> output_keys, fetches;
  for (const auto& [key, info] : signature.outputs()) {
    output_keys.push_back(key);
    fetches.push_back(info.name());
  }
  std::vector<tensorflow::Tensor> outputs;
  absl::Status status = bundle.session->Run(feeds, fetches, {}, &outputs);
  if (!status.ok()) return status.ToString();
  for (size_t i = 0; i < outputs.size(); ++i) {
    tensorflow::TensorProto proto;
    // tensor_content holds plain values only: strings go in string_val.
    if (outputs[i].dtype() == tensorflow::DT_STRING) {
      outputs[i].AsProtoField(&proto);
    } else {
      outputs[i].AsProtoTensorContent(&proto);
    }
    if (!WriteFile(case_dir + "/out/" + output_keys[i] + ".pb", proto.SerializeAsString())) {
      return "cannot write output " + output_keys[i];
    }
  }
  return "";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: saved_model_runner <export_dir> <signature_name> <case_dir>..."
              << std::endl;
    return 2;
  }
  tensorflow::SavedModelBundle bundle;
  absl::Status status = tensorflow::LoadSavedModel(
      tensorflow::SessionOptions(), tensorflow::RunOptions(), argv[1], {"serve"}, &bundle);
  if (!status.ok()) {
    std::cerr << "LoadSavedModel: " << status.ToString() << std::endl;
    return 1;
  }
  const auto& signatures = bundle.meta_graph_def.signature_def();
  auto found = signatures.find(argv[2]);
  if (found == signatures.end()) {
    std::cerr << "no signature " << argv[2] << std::endl;
    return 1;
  }
  for (int i = 3; i < argc; ++i) {
    const std::string error = RunCase(bundle, found->second, argv[i]);
    if (!error.empty() && !WriteFile(std::string(argv[i]) + "/error.txt", error)) return 1;
  }
  return 0;
}
