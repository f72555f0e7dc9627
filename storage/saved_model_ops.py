"""The TensorFlow ops a SavedModel may run when ptqflow loads and serves it: compute only.

A SavedModel's graph is a program, and loading one runs parts of it (its restore and initializer functions) before
anything is served. So ptqflow loads a SavedModel only when every op that anything in it can run is on this list:
the arithmetic, neural-network, array, control-flow and variable ops that models TFLite can convert are made of.
It is an allowlist, not a blocklist: an op that is not here (a file read or write, a reader, a dataset, Python, a
print, a summary, the network, or any op added to TensorFlow later) is refused by name. An op a real model needs
that is missing here is added after checking what it does; it never reads or writes outside the tensors it is given.
"""

from __future__ import annotations

_GRAPH = """
    Const Placeholder PlaceholderWithDefault Identity IdentityN NoOp StopGradient PreventGradient Snapshot
    EnsureShape CheckNumerics CheckNumericsV2 Assert PartitionedCall StatefulPartitionedCall If StatelessIf While
    StatelessWhile Case StatelessCase Enter Exit Merge Switch NextIteration LoopCond ControlTrigger
"""
_VARIABLES = """
    VarHandleOp ReadVariableOp AssignVariableOp VarIsInitializedOp DisableCopyOnRead DestroyResourceOp VariableV2
    Variable Assign AssignAdd AssignSub AssignAddVariableOp AssignSubVariableOp IsVariableInitialized
    ResourceGather ResourceGatherNd HashTableV2 MutableHashTableV2 LookupTableFindV2 LookupTableImportV2
    LookupTableSizeV2 LookupTableInsertV2 InitializeTableV2
"""
_MATH = """
    Abs Acos Acosh Add AddV2 AddN All Any ApproximateEqual ArgMax ArgMin Asin Asinh Atan Atan2 Atanh BatchMatMul
    BatchMatMulV2 BatchMatMulV3 BiasAdd BiasAddV1 Cast Ceil ClipByValue Cos Cosh Cumsum Cumprod Div DivNoNan Elu
    Einsum Equal Erf Erfc Exp Expm1 Floor FloorDiv FloorMod Greater GreaterEqual Inv IsFinite IsInf IsNan LeakyRelu
    Less LessEqual Lgamma Log Log1p LogSoftmax LogicalAnd LogicalNot LogicalOr MatMul Max Maximum Mean Min Minimum
    Mod Mul MulNoNan Neg NotEqual Pow Prod Range RealDiv Reciprocal Relu Relu6 Rint Round Rsqrt Selu Sigmoid Sign
    Sin Sinh Softmax Softplus Softsign Sqrt Square SquaredDifference Sub Sum Tan Tanh TruncateDiv TruncateMod Xdivy
    Xlogy Xlog1py BitwiseAnd BitwiseOr BitwiseXor Invert LeftShift RightShift SegmentSum SegmentMax SegmentMin
    SegmentMean SegmentProd UnsortedSegmentSum UnsortedSegmentMax UnsortedSegmentMin UnsortedSegmentProd
    Bucketize EuclideanNorm L2Loss
    RFFT RFFT2D RFFT3D IRFFT IRFFT2D FFT IFFT ComplexAbs Complex Real Imag Angle Conj
"""
_NEURAL_NETWORK = """
    AvgPool AvgPool3D MaxPool MaxPoolV2 MaxPool3D MaxPoolWithArgmax Conv Conv2D Conv3D Conv2DBackpropInput
    Conv3DBackpropInputV2 DepthwiseConv2dNative DepthwiseConv2dNativeBackpropInput FusedBatchNorm FusedBatchNormV2
    FusedBatchNormV3 LRN TopKV2 InTopKV2 ResizeBilinear ResizeNearestNeighbor ResizeBicubic ResizeArea
    ScaleAndTranslate CropAndResize Dilation2D SpaceToBatchND BatchToSpaceND SpaceToDepth DepthToSpace
    NonMaxSuppressionV3 NonMaxSuppressionV4 NonMaxSuppressionV5 ExtractImagePatches MirrorPad Pad PadV2
    FakeQuantWithMinMaxArgs FakeQuantWithMinMaxVars FakeQuantWithMinMaxVarsPerChannel QuantizeAndDequantizeV2
    QuantizeAndDequantizeV3 QuantizeAndDequantizeV4 Dequantize QuantizeV2
"""
_ARRAY = """
    BroadcastArgs BroadcastGradientArgs BroadcastTo Concat ConcatV2 ConcatOffset Diag DiagPart ExpandDims Fill
    Gather GatherNd GatherV2 InvertPermutation MatrixBandPart MatrixDiag MatrixDiagV2 MatrixDiagV3 MatrixDiagPart
    MatrixDiagPartV2 MatrixDiagPartV3 MatrixSetDiag MatrixSetDiagV2 MatrixSetDiagV3 OneHot OnesLike Pack Rank
    Reshape Reverse ReverseV2 ReverseSequence ScatterNd TensorScatterUpdate TensorScatterAdd TensorScatterSub
    TensorScatterMax TensorScatterMin Select SelectV2 Shape ShapeN Size Slice Split SplitV Squeeze StridedSlice
    Tile Transpose Unique UniqueV2 Unpack Where ZerosLike LinSpace Bitcast Empty MatrixInverse Cholesky
    TensorListReserve TensorListFromTensor TensorListStack TensorListSetItem TensorListGetItem
    TensorListElementShape TensorListLength TensorListPushBack TensorListPopBack TensorListConcatV2
    TensorListGather TensorListScatterIntoExistingList TensorListResize EmptyTensorList
    TensorArrayV3 TensorArrayReadV3 TensorArrayWriteV3 TensorArrayGatherV3 TensorArrayScatterV3 TensorArraySizeV3
    TensorArrayCloseV3 TensorArrayConcatV3 TensorArraySplitV3
"""

COMPUTE_OPS = frozenset(" ".join((_GRAPH, _VARIABLES, _MATH, _NEURAL_NETWORK, _ARRAY)).split())

# Reads the model's own variables file; allowed only where the loader runs it with that file as its prefix (the
# saver's restore op of a TF1-style SavedModel), never inside a function anything else can call.
RESTORE_OP = "RestoreV2"
