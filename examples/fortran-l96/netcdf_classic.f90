! A writer of netCDF classic files (CDF-1), enough for a forecast trajectory.
!
! The host writes its output in a format the Python side reads with xarray
! (xarray.open_dataset) without linking a netCDF library into the example: the
! classic format is a short big-endian header (dimensions, attributes, variables
! with their byte offsets) followed by each variable's values, and it is simple
! enough to write directly. Fixed-size dimensions only; variables are int32 or
! float64; attributes are text, int32 or float64. Fortran arrays are written as
! they lie in memory, so a variable declared with dims (time, member, k) takes an
! array x(k, member, time).
module netcdf_classic
  use, intrinsic :: iso_fortran_env, only: int8, int32, int64, real64
  use, intrinsic :: iso_c_binding, only: c_int, c_char, c_null_char
  implicit none
  private
  public :: nc_file, nc_create, nc_dim, nc_text_att, nc_int_att, nc_real_att, nc_var, &
       nc_var_text_att, nc_write

  integer, parameter :: MAX_ITEMS = 32, NC_CHAR = 2, NC_INT = 4, NC_DOUBLE = 6

  type :: nc_att
     character(len=64) :: name = ""
     integer :: kind = 0
     character(len=512) :: text = ""
     integer(int32) :: ival = 0
     real(real64) :: rval = 0
  end type nc_att

  type :: nc_variable
     character(len=64) :: name = ""
     integer :: kind = 0, ndims = 0
     integer :: dims(8) = 0
     integer :: natts = 0
     type(nc_att) :: atts(8)
  end type nc_variable

  !> A file being defined, then written variable by variable (in declaration order).
  type :: nc_file
     character(len=:), allocatable :: path
     integer :: ndims = 0, natts = 0, nvars = 0
     character(len=64) :: dim_names(MAX_ITEMS) = ""
     integer :: dim_sizes(MAX_ITEMS) = 0
     type(nc_att) :: atts(MAX_ITEMS)
     type(nc_variable) :: vars(MAX_ITEMS)
  end type nc_file

  interface nc_write
     module procedure write_int, write_real1, write_real2, write_real3
  end interface nc_write

  interface
     integer(c_int) function c_rename(from, to) bind(C, name="rename")
       import :: c_int, c_char
       character(kind=c_char), intent(in) :: from(*), to(*)
     end function c_rename
  end interface

  ! bytes of the file being written, held until nc_write of the last variable
  integer(int8), allocatable, save :: buf(:)
  integer(int64), save :: used = 0

contains

  subroutine nc_create(nc, path)
    type(nc_file), intent(out) :: nc
    character(len=*), intent(in) :: path
    nc%path = path
  end subroutine nc_create

  integer function nc_dim(nc, name, size) result(id)
    type(nc_file), intent(inout) :: nc
    character(len=*), intent(in) :: name
    integer, intent(in) :: size
    nc%ndims = nc%ndims + 1
    nc%dim_names(nc%ndims) = name
    nc%dim_sizes(nc%ndims) = size
    id = nc%ndims
  end function nc_dim

  subroutine nc_text_att(nc, name, text)
    type(nc_file), intent(inout) :: nc
    character(len=*), intent(in) :: name, text
    nc%natts = nc%natts + 1
    nc%atts(nc%natts) = nc_att(name, NC_CHAR, text, 0, 0.0_real64)
  end subroutine nc_text_att

  subroutine nc_int_att(nc, name, value)
    type(nc_file), intent(inout) :: nc
    character(len=*), intent(in) :: name
    integer, intent(in) :: value
    nc%natts = nc%natts + 1
    nc%atts(nc%natts) = nc_att(name, NC_INT, "", int(value, int32), 0.0_real64)
  end subroutine nc_int_att

  subroutine nc_real_att(nc, name, value)
    type(nc_file), intent(inout) :: nc
    character(len=*), intent(in) :: name
    real(real64), intent(in) :: value
    nc%natts = nc%natts + 1
    nc%atts(nc%natts) = nc_att(name, NC_DOUBLE, "", 0_int32, value)
  end subroutine nc_real_att

  !> Declare a variable over dims (slowest first, as netCDF lists them); kind "int" or
  !> "double". Variables are then written with nc_write, in the order declared.
  integer function nc_var(nc, name, kind, dims) result(id)
    type(nc_file), intent(inout) :: nc
    character(len=*), intent(in) :: name, kind
    integer, intent(in) :: dims(:)
    nc%nvars = nc%nvars + 1
    id = nc%nvars
    nc%vars(id)%name = name
    nc%vars(id)%kind = merge(NC_INT, NC_DOUBLE, kind == "int")
    nc%vars(id)%ndims = size(dims)
    nc%vars(id)%dims(1:size(dims)) = dims
  end function nc_var

  subroutine nc_var_text_att(nc, var, name, text)
    type(nc_file), intent(inout) :: nc
    integer, intent(in) :: var
    character(len=*), intent(in) :: name, text
    associate (v => nc%vars(var))
      v%natts = v%natts + 1
      v%atts(v%natts) = nc_att(name, NC_CHAR, text, 0, 0.0_real64)
    end associate
  end subroutine nc_var_text_att

  ! -- bytes ------------------------------------------------------------------------
  subroutine put_bytes(b)
    integer(int8), intent(in) :: b(:)
    integer(int8), allocatable :: grown(:)
    if (.not. allocated(buf)) allocate(buf(65536))
    do while (used + size(b) > size(buf, kind=int64))
       allocate(grown(2 * size(buf)))
       grown(1:used) = buf(1:used)
       call move_alloc(grown, buf)
    end do
    buf(used + 1:used + size(b)) = b
    used = used + size(b)
  end subroutine put_bytes

  !> True on a machine that stores the low byte first (the file is big-endian).
  logical function little_endian()
    integer(int8) :: b(4)
    b = transfer(1_int32, b)
    little_endian = b(1) == 1_int8
  end function little_endian

  subroutine put_i32(v)
    integer(int32), intent(in) :: v
    integer(int8) :: b(4)
    b = transfer(v, b)  ! the machine's bytes, reversed when it is little-endian
    if (little_endian()) b = b(4:1:-1)
    call put_bytes(b)
  end subroutine put_i32

  subroutine put_f64(v)
    real(real64), intent(in) :: v
    integer(int8) :: b(8)
    b = transfer(v, b)
    if (little_endian()) b = b(8:1:-1)
    call put_bytes(b)
  end subroutine put_f64

  subroutine put_name(s)
    character(len=*), intent(in) :: s
    integer :: i, n
    n = len_trim(s)
    call put_i32(int(n, int32))
    do i = 1, n
       call put_bytes([transfer(s(i:i), 0_int8)])
    end do
    do i = 1, modulo(-n, 4)
       call put_bytes([0_int8])
    end do
  end subroutine put_name

  subroutine put_atts(atts, n)
    type(nc_att), intent(in) :: atts(:)
    integer, intent(in) :: n
    integer :: i
    if (n == 0) then
       call put_i32(0_int32)
       call put_i32(0_int32)
       return
    end if
    call put_i32(12_int32)  ! NC_ATTRIBUTE
    call put_i32(int(n, int32))
    do i = 1, n
       call put_name(atts(i)%name)
       call put_i32(int(atts(i)%kind, int32))
       select case (atts(i)%kind)
       case (NC_CHAR)
          call put_name(atts(i)%text)  ! the same layout: count, bytes, padding
       case (NC_INT)
          call put_i32(1_int32)
          call put_i32(atts(i)%ival)
       case default
          call put_i32(1_int32)
          call put_f64(atts(i)%rval)
       end select
    end do
  end subroutine put_atts

  integer(int64) function var_bytes(nc, v)
    type(nc_file), intent(in) :: nc
    integer, intent(in) :: v
    integer :: i
    var_bytes = merge(4_int64, 8_int64, nc%vars(v)%kind == NC_INT)
    do i = 1, nc%vars(v)%ndims
       var_bytes = var_bytes * nc%dim_sizes(nc%vars(v)%dims(i))
    end do
  end function var_bytes

  !> The header, with each variable's offset; called by the first nc_write.
  subroutine put_header(nc)
    type(nc_file), intent(in) :: nc
    integer(int64) :: header_size, offset
    integer :: pass, i, j
    header_size = 0
    do pass = 1, 2  ! the first pass measures the header, the second writes offsets
       used = 0
       call put_bytes([transfer('C', 0_int8), transfer('D', 0_int8), transfer('F', 0_int8), 1_int8])
       call put_i32(0_int32)  ! numrecs: no record dimension
       call put_i32(10_int32)  ! NC_DIMENSION
       call put_i32(int(nc%ndims, int32))
       do i = 1, nc%ndims
          call put_name(nc%dim_names(i))
          call put_i32(int(nc%dim_sizes(i), int32))
       end do
       call put_atts(nc%atts, nc%natts)
       call put_i32(11_int32)  ! NC_VARIABLE
       call put_i32(int(nc%nvars, int32))
       offset = header_size
       do i = 1, nc%nvars
          associate (v => nc%vars(i))
            call put_name(v%name)
            call put_i32(int(v%ndims, int32))
            do j = 1, v%ndims
               call put_i32(int(v%dims(j) - 1, int32))
            end do
            call put_atts(v%atts, v%natts)
            call put_i32(int(v%kind, int32))
            call put_i32(int(var_bytes(nc, i) + modulo(-var_bytes(nc, i), 4_int64), int32))
            call put_i32(int(offset, int32))
            offset = offset + var_bytes(nc, i) + modulo(-var_bytes(nc, i), 4_int64)
          end associate
       end do
       header_size = used
    end do
  end subroutine put_header

  subroutine finish_var(nc, v)
    type(nc_file), intent(in) :: nc
    integer, intent(in) :: v
    integer :: u, i
    do i = 1, int(modulo(-var_bytes(nc, v), 4_int64))
       call put_bytes([0_int8])
    end do
    if (v == nc%nvars) then  ! the last variable: the file is complete, write it
       ! under a temporary name, renamed when whole: no half-written trajectory
       open(newunit=u, file=nc%path // ".partial", access="stream", form="unformatted", &
            status="replace")
       write(u) buf(1:used)
       close(u)
       if (c_rename(nc%path // ".partial" // c_null_char, nc%path // c_null_char) /= 0) &
            error stop "netcdf_classic: cannot rename the finished file into place"

       deallocate(buf)
       used = 0
    end if
  end subroutine finish_var

  subroutine start_var(nc, v)
    type(nc_file), intent(in) :: nc
    integer, intent(in) :: v
    if (v == 1) call put_header(nc)
  end subroutine start_var

  subroutine write_int(nc, v, values)
    type(nc_file), intent(in) :: nc
    integer, intent(in) :: v
    integer, intent(in) :: values(:)
    integer :: i
    call start_var(nc, v)
    do i = 1, size(values)
       call put_i32(int(values(i), int32))
    end do
    call finish_var(nc, v)
  end subroutine write_int

  subroutine write_real1(nc, v, values)
    type(nc_file), intent(in) :: nc
    integer, intent(in) :: v
    real(real64), intent(in) :: values(:)
    integer :: i
    call start_var(nc, v)
    do i = 1, size(values)
       call put_f64(values(i))
    end do
    call finish_var(nc, v)
  end subroutine write_real1

  subroutine write_real2(nc, v, values)
    type(nc_file), intent(in) :: nc
    integer, intent(in) :: v
    real(real64), intent(in), contiguous, target :: values(:, :)
    real(real64), pointer :: flat(:)
    flat(1:size(values)) => values
    call write_real1(nc, v, flat)
  end subroutine write_real2

  subroutine write_real3(nc, v, values)
    type(nc_file), intent(in) :: nc
    integer, intent(in) :: v
    real(real64), intent(in), contiguous, target :: values(:, :, :)
    real(real64), pointer :: flat(:)
    flat(1:size(values)) => values
    call write_real1(nc, v, flat)
  end subroutine write_real3

end module netcdf_classic
