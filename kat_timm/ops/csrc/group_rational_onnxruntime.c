/*
 * ONNX Runtime kernels for kat_timm's rational nodes: `kat_timm::GroupRational(x, numerator, denominator)` and
 * `kat_timm::GroupRationalBias(x, numerator, denominator, bias)`, F(x) and F(x + bias) over x's last axis, float32.
 *
 * The ONNX files that kat_timm writes carry these nodes together with an ONNX function body of standard ops, so any
 * runtime can run them; ONNX Runtime uses this kernel instead of the body once the library is registered
 * (`SessionOptions.register_custom_ops_library`, see kat_timm/ops/rational_onnxruntime.py). The math is the native
 * CPU kernel's (group_rational_cpu.c, compiled into the same library); the rows are cut into chunks that ONNX
 * Runtime's own intra-op thread pool runs (KernelContext_ParallelFor), so no second thread pool competes with it.
 *
 * Plain C against ONNX Runtime's C ABI, without its headers (the Python wheel ships none): the few functions used
 * are read from the OrtApi table by their slot, which the ABI never moves (new functions are only appended), and
 * the OrtCustomOp struct is filled up to the fields of API version KAT_ORT_OP_VERSION.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

int kat_rational_forward(int dtype, const void *x, void *y, int64_t total, int64_t groups, int64_t seg_len,
                         const float *num, int64_t num_row_stride, const float *den, const float *bias,
                         int nthreads);

/* The API version this file asks for; KernelContext_ParallelFor and the op fields below exist from it on. */
#define KAT_ORT_API_VERSION 18
#define KAT_ORT_OP_VERSION 18

/* Slots (index of the function pointer) in the OrtApi table. */
enum {
    SLOT_CREATE_STATUS = 0,
    SLOT_CREATE_CUSTOM_OP_DOMAIN = 26,
    SLOT_CUSTOM_OP_DOMAIN_ADD = 27,
    SLOT_ADD_CUSTOM_OP_DOMAIN = 28,
    SLOT_GET_TENSOR_MUTABLE_DATA = 51,
    SLOT_GET_DIMENSIONS_COUNT = 61,
    SLOT_GET_DIMENSIONS = 62,
    SLOT_GET_TENSOR_TYPE_AND_SHAPE = 65,
    SLOT_KERNEL_CONTEXT_GET_INPUT = 90,
    SLOT_KERNEL_CONTEXT_GET_OUTPUT = 91,
    SLOT_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
    SLOT_KERNEL_CONTEXT_PARALLEL_FOR = 274,
};

typedef void *Status;  /* OrtStatus*: NULL is success */
typedef struct { const void *const *(*GetApi)(uint32_t version); const char *(*GetVersionString)(void); } ApiBase;

typedef Status (*CreateStatusFn)(int code, const char *message);
typedef Status (*CreateCustomOpDomainFn)(const char *domain, void **out);
typedef Status (*CustomOpDomainAddFn)(void *domain, const void *op);
typedef Status (*AddCustomOpDomainFn)(void *options, void *domain);
typedef Status (*GetTensorMutableDataFn)(void *value, void **out);
typedef Status (*GetDimensionsCountFn)(const void *info, size_t *out);
typedef Status (*GetDimensionsFn)(const void *info, int64_t *dims, size_t count);
typedef Status (*GetTensorTypeAndShapeFn)(const void *value, void **out);
typedef Status (*KernelContextGetInputFn)(const void *context, size_t index, const void **out);
typedef Status (*KernelContextGetOutputFn)(void *context, size_t index, const int64_t *dims, size_t count, void **out);
typedef void (*ReleaseTensorTypeAndShapeInfoFn)(void *info);
typedef Status (*ParallelForFn)(const void *context, void (*fn)(void *, size_t), size_t total, size_t batches,
                                void *data);

static const void *const *api;  /* the OrtApi table, as an array of function pointers */
#define API(slot, type) ((type)api[slot])

enum { ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { ELEMENT_FLOAT = 1 };
enum { CHARACTERISTIC_REQUIRED = 0 };

#define KAT_MAX_RANK 8
/* Elements per task handed to the thread pool: as the native kernel's own chunks. */
#define KAT_TASK_ELEMENTS 32768

/* OrtCustomOp, its fields in ABI order, the last ones of newer versions included (each has a harmless value). */
typedef struct CustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct CustomOp *op, const void *api, const void *info);
    const char *(*GetName)(const struct CustomOp *op);
    const char *(*GetExecutionProviderType)(const struct CustomOp *op);
    int (*GetInputType)(const struct CustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const struct CustomOp *op);
    int (*GetOutputType)(const struct CustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const struct CustomOp *op);
    void (*KernelCompute)(void *kernel, void *context);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const struct CustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const struct CustomOp *op, size_t index);
    int (*GetInputMemoryType)(const struct CustomOp *op, size_t index);
    int (*GetVariadicInputMinArity)(const struct CustomOp *op);
    int (*GetVariadicInputHomogeneity)(const struct CustomOp *op);
    int (*GetVariadicOutputMinArity)(const struct CustomOp *op);
    int (*GetVariadicOutputHomogeneity)(const struct CustomOp *op);
    Status (*CreateKernelV2)(const struct CustomOp *op, const void *api, const void *info, void **kernel);
    Status (*KernelComputeV2)(void *kernel, void *context);
    Status (*InferOutputShapeFn)(const struct CustomOp *op, void *context);
    int (*GetStartVersion)(const struct CustomOp *op);
    int (*GetEndVersion)(const struct CustomOp *op);
    size_t (*GetMayInplace)(int **inputs, int **outputs);
    void (*ReleaseMayInplace)(int *inputs, int *outputs);
    size_t (*GetAliasMap)(int **inputs, int **outputs);
    void (*ReleaseAliasMap)(int *inputs, int *outputs);
    /* the op's definition, after every ABI field of KAT_ORT_OP_VERSION (the runtime reads none past them) */
    const char *name;
    size_t inputs;
} CustomOp;

/* The kernel is the op itself: it has no per-node state. */
typedef struct {
    const float *x, *num, *den, *bias;
    float *y;
    int64_t groups, seg_len, row_len, rows_per_task, rows, num_stride;
    int failed;
} Task;

static void run_task(void *data, size_t index) {
    Task *t = (Task *)data;
    int64_t first = (int64_t)index * t->rows_per_task;
    int64_t rows = t->rows - first < t->rows_per_task ? t->rows - first : t->rows_per_task;
    int64_t offset = first * t->row_len;
    if (kat_rational_forward(0, t->x + offset, t->y + offset, rows * t->row_len, t->groups, t->seg_len, t->num,
                             t->num_stride, t->den, t->bias, 1))
        t->failed = 1;
}

/* dims and rank of an input; element count in *count. NULL on success, else an error status. */
static Status input_shape(const void *value, int64_t *dims, size_t *rank, int64_t *count) {
    void *info = NULL;
    Status status = API(SLOT_GET_TENSOR_TYPE_AND_SHAPE, GetTensorTypeAndShapeFn)(value, &info);
    if (status) return status;
    status = API(SLOT_GET_DIMENSIONS_COUNT, GetDimensionsCountFn)(info, rank);
    if (!status && *rank > KAT_MAX_RANK)
        status = API(SLOT_CREATE_STATUS, CreateStatusFn)(ORT_INVALID_ARGUMENT, "kat_timm::GroupRational: rank > 8");
    if (!status) status = API(SLOT_GET_DIMENSIONS, GetDimensionsFn)(info, dims, *rank);
    API(SLOT_RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, ReleaseTensorTypeAndShapeInfoFn)(info);
    *count = 1;
    for (size_t i = 0; i < *rank; ++i) *count *= dims[i];
    return status;
}

static Status fail(const char *message) {
    return API(SLOT_CREATE_STATUS, CreateStatusFn)(ORT_INVALID_ARGUMENT, message);
}

static Status compute(void *kernel, void *context) {
    const CustomOp *op = (const CustomOp *)kernel;
    const void *in[4] = {NULL, NULL, NULL, NULL};
    int64_t dims[4][KAT_MAX_RANK];
    size_t rank[4];
    int64_t count[4];
    Status status;
    for (size_t i = 0; i < op->inputs; ++i) {
        status = API(SLOT_KERNEL_CONTEXT_GET_INPUT, KernelContextGetInputFn)(context, i, &in[i]);
        if (status) return status;
        if (!in[i]) return fail("kat_timm::GroupRational: an input is missing");
        status = input_shape(in[i], dims[i], &rank[i], &count[i]);
        if (status) return status;
    }
    if (rank[0] < 1) return fail("kat_timm::GroupRational: x must have a channel axis (the last)");
    int64_t channels = dims[0][rank[0] - 1];
    if (rank[2] != 2 || dims[2][1] != 4 || dims[2][0] < 1)
        return fail("kat_timm::GroupRational: denominator must be (G, 4)");
    int64_t groups = dims[2][0];
    if (rank[1] != 2 || dims[1][1] != 6 || (dims[1][0] != 1 && dims[1][0] != groups))
        return fail("kat_timm::GroupRational: numerator must be (1, 6) or (G, 6)");
    if (channels % groups) return fail("kat_timm::GroupRational: the last axis is not a multiple of G");
    if (op->inputs == 4 && (rank[3] != 1 || dims[3][0] != channels))
        return fail("kat_timm::GroupRational: bias must be (C,), C the last axis of x");
    void *out = NULL;
    status = API(SLOT_KERNEL_CONTEXT_GET_OUTPUT, KernelContextGetOutputFn)(context, 0, dims[0], rank[0], &out);
    if (status) return status;
    if (count[0] == 0) return NULL;
    void *data[5];
    for (size_t i = 0; i < op->inputs; ++i) {
        status = API(SLOT_GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)((void *)in[i], &data[i]);
        if (status) return status;
    }
    status = API(SLOT_GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)(out, &data[4]);
    if (status) return status;
    Task task = {(const float *)data[0], (const float *)data[1], (const float *)data[2],
                 op->inputs == 4 ? (const float *)data[3] : NULL, (float *)data[4],
                 groups, channels / groups, channels, 0, count[0] / channels, dims[1][0] == 1 ? 0 : 6, 0};
    task.rows_per_task = KAT_TASK_ELEMENTS / channels > 0 ? KAT_TASK_ELEMENTS / channels : 1;
    size_t tasks = (size_t)((task.rows + task.rows_per_task - 1) / task.rows_per_task);
    if (tasks == 1) {
        run_task(&task, 0);
    } else {
        status = API(SLOT_KERNEL_CONTEXT_PARALLEL_FOR, ParallelForFn)(context, run_task, tasks, 0, &task);
        if (status) return status;
    }
    return task.failed ? API(SLOT_CREATE_STATUS, CreateStatusFn)(ORT_FAIL, "kat_timm::GroupRational: out of memory")
                       : NULL;
}

static void *create_kernel(const CustomOp *op, const void *api_, const void *info) { return (void *)op; }
static Status create_kernel_v2(const CustomOp *op, const void *api_, const void *info, void **kernel) {
    *kernel = (void *)op;
    return NULL;
}
static void compute_v1(void *kernel, void *context) { (void)compute(kernel, context); }  /* unused: V2 is given */
static void destroy_kernel(void *kernel) {}
static const char *op_name(const CustomOp *op) { return op->name; }
static const char *op_provider(const CustomOp *op) { return "CPUExecutionProvider"; }
static int float_type(const CustomOp *op, size_t index) { return ELEMENT_FLOAT; }
static size_t input_count(const CustomOp *op) { return op->inputs; }
static size_t one(const CustomOp *op) { return 1; }
static int required(const CustomOp *op, size_t index) { return CHARACTERISTIC_REQUIRED; }
static int default_memory(const CustomOp *op, size_t index) { return 0; }
static int arity(const CustomOp *op) { return 1; }
static int start_version(const CustomOp *op) { return 1; }
static int end_version(const CustomOp *op) { return 2147483647; }
static size_t no_pairs(int **inputs, int **outputs) { *inputs = NULL; *outputs = NULL; return 0; }
static void release_pairs(int *inputs, int *outputs) {}

#define KAT_OP(NAME, INPUTS)                                                                                        \
    {KAT_ORT_OP_VERSION, create_kernel, op_name, op_provider, float_type, input_count, float_type, one,             \
     compute_v1, destroy_kernel, required, required, default_memory, arity, arity, arity, arity,                   \
     create_kernel_v2, compute, NULL, start_version, end_version, no_pairs, release_pairs, no_pairs, release_pairs,   \
     NAME, INPUTS}

static const CustomOp kat_ops[2] = {KAT_OP("GroupRational", 3), KAT_OP("GroupRationalBias", 4)};

/* Called by ONNX Runtime when the library is registered with a session's options. */
__attribute__((visibility("default"))) Status RegisterCustomOps(void *options, const ApiBase *base) {
    api = base->GetApi(KAT_ORT_API_VERSION);
    if (!api) return NULL;  /* an ONNX Runtime older than 1.17: nothing registered, the function bodies run */
    void *domain = NULL;
    Status status = API(SLOT_CREATE_CUSTOM_OP_DOMAIN, CreateCustomOpDomainFn)("kat_timm", &domain);
    for (int i = 0; !status && i < 2; ++i)
        status = API(SLOT_CUSTOM_OP_DOMAIN_ADD, CustomOpDomainAddFn)(domain, &kat_ops[i]);
    if (!status) status = API(SLOT_ADD_CUSTOM_OP_DOMAIN, AddCustomOpDomainFn)(options, domain);
    return status;
}
