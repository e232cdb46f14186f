//! The CUDA side of kiln, loaded at run time so that the same binary runs on machines without
//! CUDA. So far: finding the libraries (`libs`); the device backend is the CUDA issue's.

pub mod libs;
