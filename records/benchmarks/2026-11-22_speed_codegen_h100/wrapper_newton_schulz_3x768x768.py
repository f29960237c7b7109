    def call(self, args):
        arg0_1, = args
        args.clear()
        assert_size_stride(arg0_1, (3, 768, 768), (589824, 768, 1))
        with torch.cuda._DeviceGuard(0):
            torch.cuda.set_device(0)
            buf0 = empty_strided_cuda((3, 1, 1, 72), (72, 216, 216, 1), torch.float32)
            # Topologically Sorted Source Nodes: [x, norm], Original ATen: [aten._to_copy, aten.linalg_vector_norm]
            stream0 = get_raw_stream(0)
            triton_red_fused__to_copy_linalg_vector_norm_0.run(arg0_1, buf0, 216, 8192, stream=stream0)
            buf1 = empty_strided_cuda((3, 1, 1), (1, 3, 3), torch.float32)
            # Topologically Sorted Source Nodes: [x, norm], Original ATen: [aten._to_copy, aten.linalg_vector_norm]
            stream0 = get_raw_stream(0)
            triton_per_fused__to_copy_linalg_vector_norm_1.run(buf0, buf1, 3, 72, stream=stream0)
            del buf0
            buf2 = empty_strided_cuda((3, 768, 768), (589824, 768, 1), torch.bfloat16)
            # Topologically Sorted Source Nodes: [x, norm, add, x_1], Original ATen: [aten._to_copy, aten.linalg_vector_norm, aten.add, aten.div]
            stream0 = get_raw_stream(0)
            triton_poi_fused__to_copy_add_div_linalg_vector_norm_2.run(arg0_1, buf1, buf2, 1769472, stream=stream0)
            buf3 = empty_strided_cuda((3, 768, 768), (589824, 768, 1), torch.bfloat16)
            # Topologically Sorted Source Nodes: [x, norm, add, x_1, getattr_1, gram], Original ATen: [aten._to_copy, aten.linalg_vector_norm, aten.add, aten.div, aten.transpose, aten.bmm]
            extern_kernels.bmm(buf2, reinterpret_tensor(buf2, (3, 768, 768), (589824, 1, 768), 0), out=buf3)
            buf4 = empty_strided_cuda((3, 768, 768), (589824, 768, 1), torch.bfloat16)
            # Topologically Sorted Source Nodes: [mul_2], Original ATen: [aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused_mul_3.run(buf3, buf4, 1769472, stream=stream0)
            buf5 = empty_strided_cuda((3, 768, 768), (589824, 768, 1), torch.bfloat16)
            # Topologically Sorted Source Nodes: [mul_2, matmul_1], Original ATen: [aten.mul, aten.bmm]
            extern_kernels.bmm(buf4, buf3, out=buf5)
            buf6 = buf3; del buf3  # reuse
            # Topologically Sorted Source Nodes: [mul_1, add_1], Original ATen: [aten.mul, aten.add]
            stream0 = get_raw_stream(0)
            triton_poi_fused_add_mul_4.run(buf6, buf5, 1769472, stream=stream0)
            buf7 = buf5; del buf5  # reuse
            # Topologically Sorted Source Nodes: [mul_1, add_1, matmul_2], Original ATen: [aten.mul, aten.add, aten.bmm]
            extern_kernels.bmm(buf6, buf2, out=buf7)
            buf8 = buf6; del buf6  # reuse
            # Topologically Sorted Source Nodes: [x, norm, add, x_1, mul, x_2], Original ATen: [aten._to_copy, aten.linalg_vector_norm, aten.add, aten.div, aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused__to_copy_add_div_linalg_vector_norm_mul_5.run(arg0_1, buf1, buf7, buf8, 1769472, stream=stream0)
            buf9 = buf2; del buf2  # reuse
            # Topologically Sorted Source Nodes: [x, norm, add, x_1, mul, x_2, getattr_2, gram_1], Original ATen: [aten._to_copy, aten.linalg_vector_norm, aten.add, aten.div, aten.mul, aten.transpose, aten.bmm]
            extern_kernels.bmm(buf8, reinterpret_tensor(buf8, (3, 768, 768), (589824, 1, 768), 0), out=buf9)
            buf10 = buf4; del buf4  # reuse
            # Topologically Sorted Source Nodes: [mul_5], Original ATen: [aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused_mul_3.run(buf9, buf10, 1769472, stream=stream0)
            buf11 = empty_strided_cuda((3, 768, 768), (589824, 768, 1), torch.bfloat16)
            # Topologically Sorted Source Nodes: [mul_5, matmul_4], Original ATen: [aten.mul, aten.bmm]
            extern_kernels.bmm(buf10, buf9, out=buf11)
            buf12 = buf9; del buf9  # reuse
            # Topologically Sorted Source Nodes: [mul_4, add_3], Original ATen: [aten.mul, aten.add]
            stream0 = get_raw_stream(0)
            triton_poi_fused_add_mul_4.run(buf12, buf11, 1769472, stream=stream0)
            buf13 = buf11; del buf11  # reuse
            # Topologically Sorted Source Nodes: [mul_4, add_3, matmul_5], Original ATen: [aten.mul, aten.add, aten.bmm]
            extern_kernels.bmm(buf12, buf8, out=buf13)
            buf14 = buf8; del buf8  # reuse
            # Topologically Sorted Source Nodes: [x, norm, add, x_1, mul, x_2, mul_3, x_3], Original ATen: [aten._to_copy, aten.linalg_vector_norm, aten.add, aten.div, aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused__to_copy_add_div_linalg_vector_norm_mul_6.run(arg0_1, buf1, buf7, buf13, buf14, 1769472, stream=stream0)
            buf15 = buf12; del buf12  # reuse
            # Topologically Sorted Source Nodes: [x, norm, add, x_1, mul, x_2, mul_3, x_3, getattr_3, gram_2], Original ATen: [aten._to_copy, aten.linalg_vector_norm, aten.add, aten.div, aten.mul, aten.transpose, aten.bmm]
            extern_kernels.bmm(buf14, reinterpret_tensor(buf14, (3, 768, 768), (589824, 1, 768), 0), out=buf15)
            buf16 = buf10; del buf10  # reuse
            # Topologically Sorted Source Nodes: [mul_8], Original ATen: [aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused_mul_3.run(buf15, buf16, 1769472, stream=stream0)
            buf17 = empty_strided_cuda((3, 768, 768), (589824, 768, 1), torch.bfloat16)
            # Topologically Sorted Source Nodes: [mul_8, matmul_7], Original ATen: [aten.mul, aten.bmm]
            extern_kernels.bmm(buf16, buf15, out=buf17)
            del buf16
            buf18 = buf15; del buf15  # reuse
            # Topologically Sorted Source Nodes: [mul_7, add_5], Original ATen: [aten.mul, aten.add]
            stream0 = get_raw_stream(0)
            triton_poi_fused_add_mul_4.run(buf18, buf17, 1769472, stream=stream0)
            buf19 = buf17; del buf17  # reuse
            # Topologically Sorted Source Nodes: [mul_7, add_5, matmul_8], Original ATen: [aten.mul, aten.add, aten.bmm]
            extern_kernels.bmm(buf18, buf14, out=buf19)
            buf20 = buf7; del buf7  # reuse
            # Topologically Sorted Source Nodes: [x, norm, add, x_1, mul, x_2, mul_3, x_3, mul_6, x_4], Original ATen: [aten._to_copy, aten.linalg_vector_norm, aten.add, aten.div, aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused__to_copy_add_div_linalg_vector_norm_mul_7.run(buf20, arg0_1, buf1, buf13, buf19, 1769472, stream=stream0)
            del arg0_1
            del buf1
            buf21 = buf19; del buf19  # reuse
            # Topologically Sorted Source Nodes: [getattr_4, gram_3], Original ATen: [aten.transpose, aten.bmm]
            extern_kernels.bmm(buf20, reinterpret_tensor(buf20, (3, 768, 768), (589824, 1, 768), 0), out=buf21)
            buf22 = buf13; del buf13  # reuse
            # Topologically Sorted Source Nodes: [mul_11], Original ATen: [aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused_mul_3.run(buf21, buf22, 1769472, stream=stream0)
            buf23 = buf18; del buf18  # reuse
            # Topologically Sorted Source Nodes: [mul_11, matmul_10], Original ATen: [aten.mul, aten.bmm]
            extern_kernels.bmm(buf22, buf21, out=buf23)
            buf24 = buf21; del buf21  # reuse
            # Topologically Sorted Source Nodes: [mul_10, add_7], Original ATen: [aten.mul, aten.add]
            stream0 = get_raw_stream(0)
            triton_poi_fused_add_mul_4.run(buf24, buf23, 1769472, stream=stream0)
            buf25 = buf23; del buf23  # reuse
            # Topologically Sorted Source Nodes: [mul_10, add_7, matmul_11], Original ATen: [aten.mul, aten.add, aten.bmm]
            extern_kernels.bmm(buf24, buf20, out=buf25)
            buf26 = buf24; del buf24  # reuse
            # Topologically Sorted Source Nodes: [mul_9, x_5], Original ATen: [aten.mul, aten.add]
            stream0 = get_raw_stream(0)
            triton_poi_fused_add_mul_8.run(buf20, buf25, buf26, 1769472, stream=stream0)
            buf27 = buf22; del buf22  # reuse
            # Topologically Sorted Source Nodes: [mul_9, x_5, getattr_5, gram_4], Original ATen: [aten.mul, aten.add, aten.transpose, aten.bmm]
            extern_kernels.bmm(buf26, reinterpret_tensor(buf26, (3, 768, 768), (589824, 1, 768), 0), out=buf27)
            buf28 = buf14; del buf14  # reuse
            # Topologically Sorted Source Nodes: [mul_14], Original ATen: [aten.mul]
            stream0 = get_raw_stream(0)
            triton_poi_fused_mul_3.run(buf27, buf28, 1769472, stream=stream0)
            buf29 = empty_strided_cuda((3, 768, 768), (589824, 768, 1), torch.bfloat16)
            # Topologically Sorted Source Nodes: [mul_14, matmul_13], Original ATen: [aten.mul, aten.bmm]
            extern_kernels.bmm(buf28, buf27, out=buf29)
            del buf28
            buf30 = buf27; del buf27  # reuse
            # Topologically Sorted Source Nodes: [mul_13, add_9], Original ATen: [aten.mul, aten.add]
            stream0 = get_raw_stream(0)
            triton_poi_fused_add_mul_4.run(buf30, buf29, 1769472, stream=stream0)
            buf31 = buf29; del buf29  # reuse
            # Topologically Sorted Source Nodes: [mul_13, add_9, matmul_14], Original ATen: [aten.mul, aten.add, aten.bmm]
            extern_kernels.bmm(buf30, buf26, out=buf31)
            del buf26
            del buf30
            buf32 = buf20; del buf20  # reuse
            # Topologically Sorted Source Nodes: [mul_9, x_5, mul_12, x_6], Original ATen: [aten.mul, aten.add]
            stream0 = get_raw_stream(0)
            triton_poi_fused_add_mul_9.run(buf32, buf25, buf31, 1769472, stream=stream0)
            del buf25
            del buf31
        return (buf32, )

