/* Preloaded CUDA-runtime interposer: answers the runtime calls that C++ device guards, stream setup and
 * autograd's stream bookkeeping make, so that torch code on fake CUDA tensors runs without a GPU or a
 * driver. (Pinned host memory is faked in Python: see fake_cuda.py.) */

int cudaGetDevice(int *device) { *device = 0; return 0; }
int cudaSetDevice(int device) { (void)device; return 0; }
int cudaGetDeviceCount(int *count) { *count = 1; return 0; }
int cudaDriverGetVersion(int *version) { *version = 13000; return 0; }
int cudaDeviceGetStreamPriorityRange(int *least, int *greatest) { *least = 0; *greatest = -5; return 0; }
int cudaStreamCreateWithPriority(void **stream, unsigned flags, int priority) {
    static char fake_stream[64];
    (void)flags; (void)priority;
    *stream = (void *)fake_stream;
    return 0;
}
int cudaGetLastError(void) { return 0; }
int cudaPeekAtLastError(void) { return 0; }
