/* Stand-in driver library (loaded as libcuda.so.1): only what c10's primary-context query needs while
 * torch works on fake CUDA tensors. */
int cuInit(unsigned flags) { (void)flags; return 0; }
int cuDriverGetVersion(int *version) { *version = 13000; return 0; }
int cuDevicePrimaryCtxGetState(int device, unsigned *flags, int *active) {
    (void)device;
    *flags = 0;
    *active = 1;
    return 0;
}
int cuGetErrorString(int error, const char **text) { (void)error; *text = "fake GPU stub"; return 0; }
int cuGetErrorName(int error, const char **text) { (void)error; *text = "fake GPU stub"; return 0; }
