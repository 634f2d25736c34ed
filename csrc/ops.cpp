// The torch ops of the extension: their schemas, their CPU implementations, and a Python module
// whose import runs these registrations (`import fastgpt._C_avx512`, or the AVX2 or baseline build).
//
// The ops are the raw forward and backward kernels. Autograd and the shape-only ("fake") versions
// that torch.compile traces with are registered in Python, in fastgpt/ops/cpp.py.

#include <Python.h>
#include <torch/library.h>

#include <tuple>

namespace fastgpt {

std::tuple<at::Tensor, at::Tensor> causal_attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward(
    const at::Tensor& x, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    double eps);
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const c10::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd);
at::Tensor gelu_forward(const at::Tensor& x);
at::Tensor gelu_backward(const at::Tensor& grad_y, const at::Tensor& x);
at::Tensor decode_block(const at::Tensor& x, const at::Tensor& ln_1_weight, const c10::optional<at::Tensor>& ln_1_bias,
                        const at::Tensor& attn_weight, const c10::optional<at::Tensor>& attn_bias,
                        const at::Tensor& attn_proj_weight, const c10::optional<at::Tensor>& attn_proj_bias,
                        const at::Tensor& ln_2_weight, const c10::optional<at::Tensor>& ln_2_bias,
                        const at::Tensor& fc_weight, const c10::optional<at::Tensor>& fc_bias,
                        const at::Tensor& mlp_proj_weight, const c10::optional<at::Tensor>& mlp_proj_bias,
                        at::Tensor& k_cache, at::Tensor& v_cache, int64_t position, double eps);

TORCH_LIBRARY(fastgpt, m) {
  // lse: the log-sum-exp of each query's scores, (B, H, Tq), fp32 (fp64 for fp64 inputs).
  m.def("causal_attention_forward(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  m.def("causal_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // mean, rstd: the row statistics, x.shape[:-1], fp32 (fp64 for fp64 x). grad_weight and
  // grad_bias come back in that accumulation type whether or not weight and bias were given.
  m.def("layer_norm_forward(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def("layer_norm_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor rstd) "
        "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
  // GELU with the tanh approximation (GPT-2's); the output and grad_x are contiguous, in x's dtype.
  m.def("gelu_forward(Tensor x) -> Tensor");
  m.def("gelu_backward(Tensor grad_y, Tensor x) -> Tensor");
  // One block of the model for one new token per sequence (x: (batch, channels)), inference only:
  // writes the token's keys and values into row `position` of the (batch, heads, capacity, head_dim)
  // caches and returns the block's output. eps is both LayerNorms' (GPT-2 gives them one value).
  // RMSNorm over the last dimension; rstd: x.shape[:-1], fp32 (fp64 for fp64 x). grad_weight is in
  // that accumulation type, and empty when there is no weight.
  m.def("cpp_rms_norm_forward(Tensor x, Tensor? weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("cpp_rms_norm_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor rstd) "
        "-> (Tensor grad_x, Tensor grad_weight)");
  // Rotary position embeddings of a (B, H, T, D) tensor whose rows are positions offset .. offset + T - 1.
  m.def("cpp_rotary_forward(Tensor x, int offset, float base) -> Tensor");
  m.def("cpp_rotary_backward(Tensor grad_y, int offset, float base) -> Tensor");
  // ReLU^2 (relu(x) squared); the output and grad_x are contiguous, in x's dtype.
  m.def("cpp_relu_squared_forward(Tensor x) -> Tensor");
  m.def("cpp_relu_squared_backward(Tensor grad_y, Tensor x) -> Tensor");
  // SwiGLU of x = [gate, up] (..., 2N): silu(gate) * up, (..., N); grad_x is (..., 2N). Contiguous, x's dtype.
  m.def("cpp_swiglu_forward(Tensor x) -> Tensor");
  m.def("cpp_swiglu_backward(Tensor grad_y, Tensor x) -> Tensor");
  m.def("decode_block(Tensor x, Tensor ln_1_weight, Tensor? ln_1_bias, Tensor attn_weight, Tensor? attn_bias, "
        "Tensor attn_proj_weight, Tensor? attn_proj_bias, Tensor ln_2_weight, Tensor? ln_2_bias, "
        "Tensor fc_weight, Tensor? fc_bias, Tensor mlp_proj_weight, Tensor? mlp_proj_bias, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, int position, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastgpt, CPU, m) {
  m.impl("causal_attention_forward", &causal_attention_forward);
  m.impl("causal_attention_backward", &causal_attention_backward);
  m.impl("layer_norm_forward", &layer_norm_forward);
  m.impl("layer_norm_backward", &layer_norm_backward);
  m.impl("gelu_forward", &gelu_forward);
  m.impl("gelu_backward", &gelu_backward);
  m.impl("decode_block", &decode_block);
}

}  // namespace fastgpt

// An empty Python module: importing it loads this library, and loading it runs the registrations
// above. TORCH_EXTENSION_NAME is set by the build (_C_avx512, _C_avx2 or _C_default).
#define FASTGPT_CONCAT(a, b) a##b
#define FASTGPT_MODULE_INIT(name) FASTGPT_CONCAT(PyInit_, name)
#define FASTGPT_STRING(name) #name
#define FASTGPT_MODULE_NAME(name) FASTGPT_STRING(name)

extern "C" PyObject* FASTGPT_MODULE_INIT(TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, FASTGPT_MODULE_NAME(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
