    def call(self, args):
        arg0_1, = args
        args.clear()
        assert_size_stride(arg0_1, (768, 768), (768, 1))
        with torch.cuda._DeviceGuard(0):
            torch.cuda.set_device(0)
            buf1 = empty_strided_cuda((1, 1, 72), (72, 72, 1), torch.float32)
            # Topologically Sorted Source Nodes: [x, norm], Original ATen: [aten._to_copy, aten.linalg_vector_norm]
            stream0 = get_raw_stream(0)
            triton_red_fused__to_copy_linalg_vector_norm_0.run(arg0_1, buf1, 72, 8192, stream=stream0)
            buf2 = empty_strided_cuda((1, 1), (1, 1), torch.float32)
            # Topologically Sorted Source Nodes: [x, norm], Original ATen: [aten._to_copy, aten.linalg_vector_norm]
            stream0 = get_raw_stream(0)
            triton_per_fused__to_copy_linalg_vector_norm_1.run(buf1, buf2, 1, 72, stream=stream0)
            del buf1
            buf3 = empty_strided_cuda((768, 768), (768, 1), torch.bfloat16)
            buf8 = empty_strided_cuda((768, 768), (768, 1), torch.bfloat16)
            # Topologically Sorted Source Nodes: [x, norm, add, x_1, mul], Original ATen: [aten._to_copy, aten.linalg_vector_norm, aten.add, aten.div, aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused__to_copy_add_div_linalg_vector_norm_mul_2.run(arg0_1, buf2, buf3, buf8, 589824, stream=stream0)
            del arg0_1
            del buf2
            buf4 = empty_strided_cuda((768, 768), (768, 1), torch.bfloat16)
            # Topologically Sorted Source Nodes: [getattr_1, gram], Original ATen: [aten.transpose, aten.mm]
            extern_kernels.mm(buf3, reinterpret_tensor(buf3, (768, 768), (1, 768), 0), out=buf4)
            buf5 = empty_strided_cuda((768, 768), (768, 1), torch.bfloat16)
            buf6 = empty_strided_cuda((768, 768), (768, 1), torch.bfloat16)
            # Topologically Sorted Source Nodes: [mul_1, mul_2], Original ATen: [aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused_mul_3.run(buf4, buf5, buf6, 589824, stream=stream0)
            buf7 = empty_strided_cuda((768, 768), (768, 1), torch.bfloat16)
            # Topologically Sorted Source Nodes: [mul_1, mul_2], Original ATen: [aten.mul, aten.addmm]
            extern_kernels.addmm(buf6, buf5, buf4, alpha=1, beta=1, out=buf7)
            del buf4
            buf9 = buf6; del buf6  # reuse
            # Topologically Sorted Source Nodes: [mul], Original ATen: [aten.mul, aten.addmm]
            extern_kernels.addmm(buf8, buf7, buf3, alpha=1, beta=1, out=buf9)
            buf10 = buf8; del buf8  # reuse
            # Topologically Sorted Source Nodes: [getattr_2, gram_1], Original ATen: [aten.transpose, aten.mm]
            extern_kernels.mm(buf9, reinterpret_tensor(buf9, (768, 768), (1, 768), 0), out=buf10)
            buf11 = buf7; del buf7  # reuse
            buf12 = buf3; del buf3  # reuse
            # Topologically Sorted Source Nodes: [mul_4, mul_5], Original ATen: [aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused_mul_3.run(buf10, buf11, buf12, 589824, stream=stream0)
            buf13 = buf5; del buf5  # reuse
            # Topologically Sorted Source Nodes: [mul_4, mul_5], Original ATen: [aten.mul, aten.addmm]
            extern_kernels.addmm(buf12, buf11, buf10, alpha=1, beta=1, out=buf13)
            buf14 = buf12; del buf12  # reuse
            # Topologically Sorted Source Nodes: [mul_3], Original ATen: [aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused_mul_4.run(buf9, buf14, 589824, stream=stream0)
            buf15 = buf11; del buf11  # reuse
            # Topologically Sorted Source Nodes: [mul_3], Original ATen: [aten.mul, aten.addmm]
            extern_kernels.addmm(buf14, buf13, buf9, alpha=1, beta=1, out=buf15)
            buf16 = buf9; del buf9  # reuse
            # Topologically Sorted Source Nodes: [getattr_3, gram_2], Original ATen: [aten.transpose, aten.mm]
            extern_kernels.mm(buf15, reinterpret_tensor(buf15, (768, 768), (1, 768), 0), out=buf16)
            buf17 = buf14; del buf14  # reuse
            buf18 = buf13; del buf13  # reuse
            # Topologically Sorted Source Nodes: [mul_7, mul_8], Original ATen: [aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused_mul_3.run(buf16, buf17, buf18, 589824, stream=stream0)
            buf19 = buf10; del buf10  # reuse
            # Topologically Sorted Source Nodes: [mul_7, mul_8], Original ATen: [aten.mul, aten.addmm]
            extern_kernels.addmm(buf18, buf17, buf16, alpha=1, beta=1, out=buf19)
            buf20 = buf18; del buf18  # reuse
            # Topologically Sorted Source Nodes: [mul_6], Original ATen: [aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused_mul_4.run(buf15, buf20, 589824, stream=stream0)
            buf21 = buf17; del buf17  # reuse
            # Topologically Sorted Source Nodes: [mul_6], Original ATen: [aten.mul, aten.addmm]
            extern_kernels.addmm(buf20, buf19, buf15, alpha=1, beta=1, out=buf21)
            buf22 = buf20; del buf20  # reuse
            # Topologically Sorted Source Nodes: [getattr_4, gram_3], Original ATen: [aten.transpose, aten.mm]
            extern_kernels.mm(buf21, reinterpret_tensor(buf21, (768, 768), (1, 768), 0), out=buf22)
            buf23 = buf19; del buf19  # reuse
            buf24 = buf15; del buf15  # reuse
            # Topologically Sorted Source Nodes: [mul_10, mul_11], Original ATen: [aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused_mul_3.run(buf22, buf23, buf24, 589824, stream=stream0)
            buf25 = buf16; del buf16  # reuse
            # Topologically Sorted Source Nodes: [mul_10, mul_11], Original ATen: [aten.mul, aten.addmm]
            extern_kernels.addmm(buf24, buf23, buf22, alpha=1, beta=1, out=buf25)
            buf26 = buf24; del buf24  # reuse
            # Topologically Sorted Source Nodes: [mul_9], Original ATen: [aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused_mul_4.run(buf21, buf26, 589824, stream=stream0)
            buf27 = buf23; del buf23  # reuse
            # Topologically Sorted Source Nodes: [mul_9], Original ATen: [aten.mul, aten.addmm]
            extern_kernels.addmm(buf26, buf25, buf21, alpha=1, beta=1, out=buf27)
            buf28 = buf26; del buf26  # reuse
            # Topologically Sorted Source Nodes: [getattr_5, gram_4], Original ATen: [aten.transpose, aten.mm]
            extern_kernels.mm(buf27, reinterpret_tensor(buf27, (768, 768), (1, 768), 0), out=buf28)
            buf29 = buf25; del buf25  # reuse
            buf30 = buf21; del buf21  # reuse
            # Topologically Sorted Source Nodes: [mul_13, mul_14], Original ATen: [aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused_mul_3.run(buf28, buf29, buf30, 589824, stream=stream0)
            buf31 = buf22; del buf22  # reuse
            # Topologically Sorted Source Nodes: [mul_13, mul_14], Original ATen: [aten.mul, aten.addmm]
            extern_kernels.addmm(buf30, buf29, buf28, alpha=1, beta=1, out=buf31)
            del buf28
            buf32 = buf30; del buf30  # reuse
            # Topologically Sorted Source Nodes: [mul_12], Original ATen: [aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused_mul_4.run(buf27, buf32, 589824, stream=stream0)
            buf33 = buf29; del buf29  # reuse
            # Topologically Sorted Source Nodes: [mul_12], Original ATen: [aten.mul, aten.addmm]
            extern_kernels.addmm(buf32, buf31, buf27, alpha=1, beta=1, out=buf33)
            del buf27
            del buf31
            del buf32
        return (buf33, )

